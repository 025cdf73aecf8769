//! The chat template a model ships with: the Jinja text (rendered by the orchestrator) and
//! the special-token strings templates refer to as `bos_token` and `eos_token`.
//!
//! Where it is looked for: a GGUF file's `tokenizer.chat_template`; in a Hugging Face
//! folder (or beside a `tokenizer.json`), `chat_template.jinja`, then `chat_template.json`,
//! then the `chat_template` of `tokenizer_config.json` (a string, or a list of named
//! templates of which `default` is used).

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use serde_json::Value as Json;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatTemplateSource {
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// The template of a model given as a `.gguf` file or a Hugging Face folder.
pub fn of_model(path: &Path) -> Result<Option<ChatTemplateSource>> {
    if path.is_dir() {
        from_folder(path)
    } else {
        Ok(from_gguf(&GgufFile::open(path, &candle_core::Device::Cpu)?))
    }
}

pub fn from_gguf(file: &GgufFile) -> Option<ChatTemplateSource> {
    let template = file.meta_str("tokenizer.chat_template")?.to_string();
    let token = |key: &str| file.token_text(key).unwrap_or_default().to_string();
    Some(ChatTemplateSource {
        template,
        bos_token: token("tokenizer.ggml.bos_token_id"),
        eos_token: token("tokenizer.ggml.eos_token_id"),
    })
}

/// A Hugging Face folder's template, or that of the folder a `tokenizer.json` lies in.
pub fn from_folder(dir: &Path) -> Result<Option<ChatTemplateSource>> {
    let config = match read_optional(&dir.join("tokenizer_config.json"))? {
        Some(text) => Some(parse_json(&dir.join("tokenizer_config.json"), &text)?),
        None => None,
    };
    let special = |key: &str| -> String {
        match config.as_ref().and_then(|c| c.get(key)) {
            Some(Json::String(s)) => s.clone(),
            // An AddedToken written out as an object.
            Some(Json::Object(o)) => o
                .get("content")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        }
    };
    let template = if let Some(t) = read_optional(&dir.join("chat_template.jinja"))? {
        Some(t)
    } else if let Some(text) = read_optional(&dir.join("chat_template.json"))? {
        let path = dir.join("chat_template.json");
        template_field(&path, parse_json(&path, &text)?.get("chat_template"))?
    } else if let Some(c) = &config {
        template_field(&dir.join("tokenizer_config.json"), c.get("chat_template"))?
    } else {
        None
    };
    Ok(template.map(|template| ChatTemplateSource {
        template,
        bos_token: special("bos_token"),
        eos_token: special("eos_token"),
    }))
}

fn template_field(path: &Path, field: Option<&Json>) -> Result<Option<String>> {
    let bad = |reason: &str| EngineError::BadFile {
        path: path.to_path_buf(),
        format: "chat template",
        reason: reason.to_string(),
    };
    match field {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(named)) => {
            let default = named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .ok_or_else(|| bad("chat_template lists named templates but none is 'default'"))?;
            default
                .get("template")
                .and_then(Json::as_str)
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| bad("the 'default' chat template has no 'template' string"))
        }
        Some(_) => Err(bad("chat_template is neither a string nor a list")),
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EngineError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_json(path: &Path, text: &str) -> Result<Json> {
    serde_json::from_str(text).map_err(|e| EngineError::BadFile {
        path: path.to_path_buf(),
        format: "JSON",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn tokenizer_config_gives_template_and_special_tokens() {
        let d = folder(&[(
            "tokenizer_config.json",
            r#"{"chat_template": "{{ bos_token }}hi", "bos_token": "<s>",
                "eos_token": {"content": "</s>", "lstrip": false}}"#,
        )]);
        let t = from_folder(d.path()).unwrap().unwrap();
        assert_eq!(t.template, "{{ bos_token }}hi");
        assert_eq!(
            (t.bos_token.as_str(), t.eos_token.as_str()),
            ("<s>", "</s>")
        );
    }

    #[test]
    fn jinja_file_wins_over_tokenizer_config_and_named_lists_use_default() {
        let d = folder(&[
            ("tokenizer_config.json", r#"{"chat_template": "old"}"#),
            ("chat_template.jinja", "new"),
        ]);
        assert_eq!(from_folder(d.path()).unwrap().unwrap().template, "new");
        let d = folder(&[(
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "tool_use", "template": "t"},
                                  {"name": "default", "template": "d"}]}"#,
        )]);
        assert_eq!(from_folder(d.path()).unwrap().unwrap().template, "d");
    }

    #[test]
    fn missing_template_is_none_and_malformed_ones_are_errors() {
        assert_eq!(from_folder(folder(&[]).path()).unwrap(), None);
        let d = folder(&[("tokenizer_config.json", r#"{"eos_token": "</s>"}"#)]);
        assert_eq!(from_folder(d.path()).unwrap(), None);
        let d = folder(&[("tokenizer_config.json", r#"{"chat_template": 3}"#)]);
        let e = from_folder(d.path()).unwrap_err().to_string();
        assert!(e.contains("neither a string nor a list"), "{e}");
        let d = folder(&[("tokenizer_config.json", "{not json")]);
        assert!(from_folder(d.path()).is_err());
        let d = folder(&[(
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "rag", "template": "t"}]}"#,
        )]);
        let e = from_folder(d.path()).unwrap_err().to_string();
        assert!(e.contains("none is 'default'"), "{e}");
    }
}
