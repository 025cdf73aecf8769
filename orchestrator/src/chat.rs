//! Chat messages to prompt text with the model's own chat template.
//!
//! Templates are Jinja, rendered as Hugging Face's `apply_chat_template` renders them:
//! `trim_blocks` and `lstrip_blocks` on, `add_generation_prompt` true, `bos_token` and
//! `eos_token` from the model, `raise_exception(msg)` failing the request with the
//! template's message, `strftime_now(fmt)`, and Python's string methods (`.strip()`,
//! `.startswith()`, ...). A model without a template gets ChatML.

use engine::chat_template::ChatTemplateSource;
use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use proto::v1::ChatMessage;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

const NAME: &str = "chat";

/// ChatML (the format of the Qwen and SmolLM instruct models) in Jinja, for models that
/// ship no template.
const CHATML: &str = "{% for m in messages %}\
    {{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}\
    {% endfor %}\
    {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for logs.
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is reported with its line.
    pub fn new(source: ChatTemplateSource, origin: impl Into<String>) -> Result<Self, String> {
        let origin = origin.into();
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            strftime(&fmt, secs)
        });
        env.add_template_owned(NAME, source.template)
            .map_err(|e| format!("chat template from {origin}: {}", describe(&e)))?;
        Ok(Self {
            env,
            bos_token: source.bos_token,
            eos_token: source.eos_token,
            origin,
        })
    }

    pub fn chatml() -> Self {
        let source = ChatTemplateSource {
            template: CHATML.into(),
            ..Default::default()
        };
        Self::new(source, "ChatML (built in)").expect("the built-in template compiles")
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The prompt for API messages; errors name the field and are the caller's to fix.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        if messages.is_empty() {
            return Err("chat.messages: no messages".into());
        }
        if let Some(i) = messages.iter().position(|m| m.role.trim().is_empty()) {
            return Err(format!("chat.messages[{i}].role: empty"));
        }
        self.render_turns(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str())),
        )
        .map_err(|e| format!("chat.messages: {e}"))
    }

    /// The prompt for `(role, content)` turns, ending where the assistant's reply begins.
    pub fn render_turns<'a>(
        &self,
        turns: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<String, String> {
        let messages: Vec<Value> = turns
            .into_iter()
            .map(|(role, content)| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(role)),
                    ("content", Value::from(content)),
                ]))
            })
            .collect();
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| format!("chat template: {}", describe(&e)))
    }
}

/// The message and, where known, the line: minijinja's `Display` alone names neither
/// the cause of a nested error nor `raise_exception`'s text on its own.
fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line()
        && !s.contains("line")
    {
        s.push_str(&format!(" (line {line})"));
    }
    s
}

/// Python's `strftime` for the codes chat templates use, in UTC.
fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_date(days);
    // 1970-01-01 was a Thursday.
    let weekday = (days + 3).rem_euclid(7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01, proleptic Gregorian.
fn civil_date(days: i64) -> (i64, u32, u32) {
    // Shift to a calendar whose years start on 1 March, so the leap day ends a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn template(text: &str) -> ChatTemplate {
        let source = ChatTemplateSource {
            template: text.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        ChatTemplate::new(source, "test").unwrap()
    }

    #[test]
    fn chatml_renders_every_turn_and_the_assistant_prompt() {
        let t = ChatTemplate::chatml();
        let text = t
            .render(&[msg("system", "Be brief."), msg("user", "hi\n  there")])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi\n  there<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn block_tags_on_their_own_lines_leave_no_whitespace() {
        // As transformers renders: trim_blocks and lstrip_blocks.
        let t = template(
            "{{ bos_token }}\n{% for m in messages %}\n    [{{ m.role }}] {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}\n[assistant]\n{% endif %}\n",
        );
        let text = t.render(&[msg("user", "  hello  ")]).unwrap();
        // What jinja2 with those options prints: lstrip_blocks strips only before tags.
        assert_eq!(text, "<s>\n    [user] hello\n[assistant]\n");
    }

    #[test]
    fn raise_exception_fails_the_request_with_the_templates_message() {
        let t = template(
            "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
             {{ raise_exception('Conversation roles must be user or assistant') }}\
             {% endif %}{{ m.content }}{% endfor %}",
        );
        assert_eq!(t.render(&[msg("user", "a")]).unwrap(), "a");
        let e = t.render(&[msg("system", "a")]).unwrap_err();
        assert!(
            e.contains("Conversation roles must be user or assistant"),
            "{e}"
        );
    }

    #[test]
    fn namespaces_loop_variables_and_string_methods_work() {
        let t = template(
            "{% set ns = namespace(system='') %}{% for m in messages %}\
             {% if m.role == 'system' %}{% set ns.system = m.content %}{% else %}\
             {{ loop.index0 }}:{{ m.content.upper() }}{% if m.content.startswith('q') %}?{% endif %};\
             {% endif %}{% endfor %}sys={{ ns.system }}|{{ eos_token }}",
        );
        let text = t
            .render(&[msg("system", "S"), msg("user", "q1"), msg("assistant", "a")])
            .unwrap();
        assert_eq!(text, "1:Q1?;2:A;sys=S|</s>");
    }

    #[test]
    fn bad_templates_and_bad_messages_give_clear_errors() {
        let e = ChatTemplate::new(
            ChatTemplateSource {
                template: "{% for m in messages %}".into(),
                ..Default::default()
            },
            "model.gguf",
        )
        .unwrap_err();
        assert!(e.contains("model.gguf"), "{e}");
        let t = ChatTemplate::chatml();
        assert!(t.render(&[]).unwrap_err().contains("no messages"));
        let e = t.render(&[msg("user", "a"), msg(" ", "b")]).unwrap_err();
        assert_eq!(e, "chat.messages[1].role: empty");
    }

    #[test]
    fn strftime_now_formats_todays_date() {
        // 2024-07-23 13:05:09 UTC, a Tuesday.
        let t = 1_721_739_909;
        assert_eq!(strftime("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(
            strftime("%A %B %d %y %H:%M:%S %% %q", t),
            "Tuesday July 23 24 13:05:09 % %q"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert_eq!(strftime("%Y-%m-%d", -86_400), "1969-12-31");
        let rendered = template("{{ strftime_now('%Y') }}")
            .render(&[msg("user", "x")])
            .unwrap();
        assert!(
            rendered.len() == 4 && rendered.parse::<u32>().is_ok_and(|y| y >= 2024),
            "{rendered}"
        );
    }
}
