//! The chat templates inside the fetched GGUF models render exactly what Hugging Face's
//! `apply_chat_template` (jinja2 with trim_blocks and lstrip_blocks) renders. The expected
//! strings were printed by jinja2 3.1 from the same templates.

use engine::testing::fetched_model;
use orchestrator::chat::ChatTemplate;
use proto::v1::ChatMessage;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn conversations() -> [Vec<ChatMessage>; 2] {
    [
        vec![msg("user", "hi")],
        vec![
            msg("system", "Be brief."),
            msg("user", "hello"),
            msg("assistant", "Hi!"),
            msg("user", "Write a haiku."),
        ],
    ]
}

/// The model's template, or None (and a SKIPPED line) when the model is not fetched.
fn template_of(file: &str) -> Option<ChatTemplate> {
    let path = fetched_model(file)?;
    let source = engine::chat_template::of_model(&path)
        .unwrap()
        .expect("the model ships a chat template");
    Some(ChatTemplate::new(source, file).unwrap())
}

const MULTI_TURN_CHATML: &str = "<|im_start|>system\nBe brief.<|im_end|>\n\
    <|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n\
    <|im_start|>user\nWrite a haiku.<|im_end|>\n<|im_start|>assistant\n";

/// One user turn gets the model's default system prompt; a conversation with its own
/// system turn renders as plain ChatML.
fn check(file: &str, default_system: &str) {
    let Some(t) = template_of(file) else {
        return;
    };
    let [single, multi] = conversations();
    assert_eq!(
        t.render(&single).unwrap(),
        format!(
            "<|im_start|>system\n{default_system}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\n"
        )
    );
    assert_eq!(t.render(&multi).unwrap(), MULTI_TURN_CHATML);
}

#[test]
fn qwen_template_adds_its_default_system_prompt() {
    check(
        "qwen2.5-coder-0.5b-instruct.gguf",
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    );
}

#[test]
fn smollm_template_adds_its_default_system_prompt() {
    check(
        "smollm2-135m-instruct-q4_1.gguf",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    );
}

#[test]
fn gguf_special_tokens_come_from_the_vocabulary() {
    let Some(path) = fetched_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let s = engine::chat_template::of_model(&path).unwrap().unwrap();
    assert_eq!(
        (s.bos_token.as_str(), s.eos_token.as_str()),
        ("<|im_start|>", "<|im_end|>")
    );
}
