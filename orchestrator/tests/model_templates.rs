//! The chat templates inside the fetched GGUF models render exactly what Hugging Face's
//! `apply_chat_template` (jinja2 with trim_blocks and lstrip_blocks) renders. The expected
//! strings were printed by jinja2 3.1 from the same templates.

use engine::testing::models_dir;
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
    let path = models_dir().join(file);
    if !path.exists() {
        println!(
            "SKIPPED: {} not present (run scripts/fetch-models.sh)",
            path.display()
        );
        return None;
    }
    let source = engine::chat_template::of_model(&path)
        .unwrap()
        .expect("the model ships a chat template");
    Some(ChatTemplate::new(source, file).unwrap())
}

const MULTI_TURN_CHATML: &str = "<|im_start|>system\nBe brief.<|im_end|>\n\
    <|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n\
    <|im_start|>user\nWrite a haiku.<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn qwen_template_adds_its_default_system_prompt() {
    let Some(t) = template_of("qwen2.5-coder-0.5b-instruct.gguf") else {
        return;
    };
    let [single, multi] = conversations();
    assert_eq!(
        t.render(&single).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.render(&multi).unwrap(), MULTI_TURN_CHATML);
}

#[test]
fn smollm_template_adds_its_default_system_prompt() {
    let Some(t) = template_of("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let [single, multi] = conversations();
    assert_eq!(
        t.render(&single).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.render(&multi).unwrap(), MULTI_TURN_CHATML);
}

#[test]
fn gguf_special_tokens_come_from_the_vocabulary() {
    let path = models_dir().join("smollm2-135m-instruct-q4_1.gguf");
    if !path.exists() {
        println!("SKIPPED: {} not present", path.display());
        return;
    }
    let s = engine::chat_template::of_model(&path).unwrap().unwrap();
    assert_eq!(
        (s.bos_token.as_str(), s.eos_token.as_str()),
        ("<|im_start|>", "<|im_end|>")
    );
}
