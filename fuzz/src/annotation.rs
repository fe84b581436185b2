//! Annotation values: the properties every accepted value has, and a generator of YAML-ish
//! values built from the real field names and the values that matter to them.

use std::fmt::Write as _;

use arbitrary::Arbitrary;
use nri_identity_injector::annotation::{
    AnnotationError, Field, FileContent, FileSet, IdentityRequest, MAX_FILE_NAME_BYTES,
    MAX_HINT_BYTES, MAX_PATH_BYTES, Policy, SpiffeId,
};

pub const ADMIN: &str = "/run/spire/admin/admin.sock";
pub const OTHER: &str = "/run/spire/other/admin.sock";

/// The daemon's default socket plus one more, as a configured node would allow.
pub fn policy() -> Policy {
    Policy::new(ADMIN).allow_agent_address(OTHER)
}

/// Longest error message we accept (the module echoes at most 200 characters of library text
/// and 64 of a key, plus its own words).
pub const MAX_ERROR_CHARS: usize = 600;

/// What must hold for an error: it is safe to log and return to the runtime.
pub fn check_error(error: &AnnotationError, input: &dyn std::fmt::Debug) {
    crate::assert_loggable(&error.to_string(), MAX_ERROR_CHARS, input);
}

fn clean_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// What must hold for an accepted value: everything the daemon will later do as root is
/// within what the module promises.
pub fn check_request(r: &IdentityRequest, policy: &Policy, input: &dyn std::fmt::Debug) {
    assert!(
        policy.allowed_agent_addresses().contains(&r.agent_address),
        "agent socket {:?} not allowed (input {input:?})",
        r.agent_address
    );
    let dir = r.cert_dir.to_str().expect("cert_dir is UTF-8");
    assert!(clean_text(dir, MAX_PATH_BYTES), "cert_dir {dir:?}");
    assert!(dir.starts_with('/') && dir != "/", "cert_dir {dir:?}");
    for component in dir[1..].split('/') {
        assert!(
            !component.is_empty() && component != "." && component != "..",
            "cert_dir {dir:?} not normalised (input {input:?})"
        );
        assert!(component.len() <= MAX_FILE_NAME_BYTES);
    }
    for reserved in ["/proc", "/sys", "/dev"] {
        assert!(
            dir != reserved && !dir.starts_with(&format!("{reserved}/")),
            "cert_dir {dir:?} under {reserved} (input {input:?})"
        );
    }
    let files = r.files.files();
    let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    for f in &files {
        assert!(
            clean_text(&f.name, MAX_FILE_NAME_BYTES),
            "file name {:?}",
            f.name
        );
        assert!(
            !f.name.contains('/') && f.name != "." && f.name != "..",
            "file name {:?} (input {input:?})",
            f.name
        );
        let bits = f.mode.bits();
        assert!(bits <= 0o777, "mode {bits:o} has special bits");
        assert!(bits & 0o400 != 0, "mode {bits:o}: owner cannot read");
        assert!(bits & 0o022 == 0, "mode {bits:o}: group or others write");
        if matches!(
            f.content,
            FileContent::PrivateKey | FileContent::KeyAndChain
        ) {
            assert!(bits & 0o007 == 0, "key mode {bits:o}: others have access");
        }
    }
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(
        before,
        names.len(),
        "two files share a name (input {input:?})"
    );
    match &r.files {
        FileSet::SpiffeHelper { svid, key, bundle } => {
            assert_eq!(svid.content, FileContent::SvidChain);
            assert_eq!(key.content, FileContent::PrivateKey);
            assert_eq!(bundle.content, FileContent::TrustBundle);
        }
        FileSet::Combined {
            credentials,
            bundle,
        } => {
            assert_eq!(credentials.content, FileContent::KeyAndChain);
            assert_eq!(bundle.content, FileContent::TrustBundle);
        }
        FileSet::Spiffe { credentials, .. } => {
            assert_eq!(credentials.content, FileContent::KeyAndChain);
        }
    }
    // The key is written before the certificates that need it.
    assert!(
        !matches!(
            files[0].content,
            FileContent::SvidChain | FileContent::TrustBundle
        ),
        "first file written is not the key"
    );
    if let Some(hint) = &r.hint {
        assert!(clean_text(hint, MAX_HINT_BYTES), "hint {hint:?}");
    }
    if let Some(id) = &r.spiffe_id {
        let again = SpiffeId::parse(id.as_str()).expect("an accepted ID parses again");
        assert_eq!(&again, id);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain(), id.path()),
            id.as_str()
        );
    }
    let summary = r.summary();
    assert!(summary.contains(dir));
}

// === the generator ===

/// A value: a top-level mapping (block or flow), optionally as a one-entry list, with
/// decoration around it that must not change its meaning.
#[derive(Arbitrary, Debug)]
pub struct Annotation {
    pub entries: Vec<(Key, Value)>,
    pub flow: bool,
    pub decor: Decor,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Decor {
    None,
    Comment,
    DocumentStart,
    DocumentEnd,
    Directive,
    ByteOrderMark,
    SecondDocument,
    TrailingJunk,
}

#[derive(Arbitrary, Debug)]
pub enum Key {
    Field(u8),
    QuotedField(u8),
    TaggedField(u8),
    Unknown(String),
    Merge,
    Null,
    Int(i16),
    Seq,
}

#[derive(Arbitrary, Debug)]
pub enum Style {
    Plain,
    Single,
    Double,
    Literal,
    Folded,
}

#[derive(Arbitrary, Debug)]
pub enum Scalar {
    Path(u8),
    Name(u8),
    Mode(u8),
    Word(u8),
    Id(u8),
    Bool(bool),
    Int(i64),
    Float(u8),
    Null,
    Text(String),
}

#[derive(Arbitrary, Debug)]
pub enum Value {
    Scalar(Scalar, Style),
    Seq(Vec<Value>),
    Map(Vec<(Key, Value)>),
    Anchored(u8, Box<Value>),
    Alias(u8),
    Tagged(u8, Box<Value>),
}

const PATHS: &[&str] = &[
    ADMIN,
    OTHER,
    "/var/certs",
    "/var/run/secrets/spiffe",
    "/",
    "/proc",
    "/proc/self",
    "/sys/x",
    "/dev/shm",
    "/device",
    "/var/../etc",
    "/var/./certs",
    "/var//certs",
    "/var/certs/",
    "var/certs",
    "unix:///run/spire/admin/admin.sock",
    "unix://run/spire/admin/admin.sock",
    "tcp://127.0.0.1:8081",
    "/run/containerd/containerd.sock",
    "/run/spire/admin/admin.sock/",
    "/run/spire/admin/../admin/admin.sock",
];
const NAMES: &[&str] = &[
    "svid.pem",
    "svid_key.pem",
    "svid_bundle.pem",
    "credential-bundle.pem",
    "key.pem",
    "bundle.pem",
    "../x",
    "a/b",
    ".",
    "..",
    "example.org.x509.pem",
    ".hidden",
    ".tmp-svid.pem",
    "",
    " ",
];
const MODES: &[&str] = &[
    "0644", "0600", "0640", "0440", "0400", "644", "600", "0o640", "000640", "0777", "0666",
    "0604", "4755", "2644", "1644", "0200", "0", "08", "0o", "0x1a4", "7777", "0644 ",
];
const WORDS: &[&str] = &[
    "fail",
    "continue",
    "spiffe-helper",
    "combined",
    "separate",
    "append",
    "pid",
    "selectors",
    "true",
    "false",
    "Fail",
    "yes",
    "on",
    "",
];
const IDS: &[&str] = &[
    "spiffe://example.org/web",
    "spiffe://example.org/ns/default/sa/web",
    "spiffe://example.org",
    "spiffe://Example.org/web",
    "spiffe://example.org/a/../b",
    "spiffe://example.org//a",
    "spiffe://example.org/a/",
    "spiffe:///a",
    "https://example.org/a",
    "spiffe://exa mple.org/a",
];
const FLOATS: &[&str] = &["1.5", ".inf", "-.inf", ".nan", "1e3", "0x10", "0o17", "+12"];
const TAGS: &[&str] = &[
    "!!str",
    "!!int",
    "!!bool",
    "!!null",
    "!!map",
    "!!seq",
    "!!binary",
    "!!float",
    "!custom",
    "!",
    "!<tag:yaml.org,2002:str>",
];

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

fn field_name(i: u8) -> &'static str {
    Field::ALL[usize::from(i) % Field::ALL.len()].as_str()
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Path(i) => pick(PATHS, *i).to_owned(),
            Scalar::Name(i) => pick(NAMES, *i).to_owned(),
            Scalar::Mode(i) => pick(MODES, *i).to_owned(),
            Scalar::Word(i) => pick(WORDS, *i).to_owned(),
            Scalar::Id(i) => pick(IDS, *i).to_owned(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(i) => pick(FLOATS, *i).to_owned(),
            Scalar::Null => "~".to_owned(),
            Scalar::Text(t) => t.clone(),
        }
    }
}

/// Double-quoted with every character that is not printable ASCII escaped.
fn double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xff => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if u32::from(c) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08x}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

/// One line: line breaks (which YAML folds or which would start a new line at column 0)
/// become spaces, so that shifting the whole value right keeps its meaning.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if matches!(c, '\n' | '\r') { ' ' } else { c })
        .collect()
}

fn render_scalar(s: &Scalar, style: &Style, flow: bool, indent: usize, out: &mut String) {
    let text = s.text();
    match style {
        Style::Plain => out.push_str(&one_line(&text)),
        Style::Single => {
            out.push('\'');
            out.push_str(&one_line(&text).replace('\'', "''"));
            out.push('\'');
        }
        Style::Double => out.push_str(&double_quoted(&text)),
        // Block scalars cannot appear in flow collections.
        Style::Literal | Style::Folded if flow => out.push_str(&double_quoted(&text)),
        Style::Literal | Style::Folded => {
            out.push_str(if matches!(style, Style::Literal) {
                "|"
            } else {
                ">"
            });
            out.push('\n');
            for line in text.replace('\r', " ").split('\n') {
                out.push_str(&" ".repeat(indent + 2));
                out.push_str(line);
                out.push('\n');
            }
            // The caller ends the entry with a newline of its own.
            out.pop();
        }
    }
}

fn render_key(k: &Key, out: &mut String) {
    match k {
        Key::Field(i) => out.push_str(field_name(*i)),
        Key::QuotedField(i) => out.push_str(&double_quoted(field_name(*i))),
        Key::TaggedField(i) => {
            out.push_str("!!str ");
            out.push_str(field_name(*i));
        }
        Key::Unknown(s) => out.push_str(&double_quoted(s)),
        Key::Merge => out.push_str("<<"),
        Key::Null => out.push('~'),
        Key::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Key::Seq => out.push_str("[a]"),
    }
}

/// A value in flow style (nested collections are always flow: valid values never nest).
fn render_flow(v: &Value, out: &mut String) {
    match v {
        Value::Scalar(s, style) => render_scalar(s, style, true, 0, out),
        Value::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_flow(item, out);
            }
            out.push(']');
        }
        Value::Map(entries) => render_flow_map(entries, out),
        Value::Anchored(n, inner) => {
            let _ = write!(out, "&a{} ", n % 8);
            render_flow(inner, out);
        }
        Value::Alias(n) => {
            let _ = write!(out, "*a{}", n % 8);
        }
        Value::Tagged(t, inner) => {
            out.push_str(pick(TAGS, *t));
            out.push(' ');
            render_flow(inner, out);
        }
    }
}

fn render_flow_map(entries: &[(Key, Value)], out: &mut String) {
    out.push('{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        render_key(k, out);
        out.push_str(": ");
        render_flow(v, out);
    }
    out.push('}');
}

impl Annotation {
    /// The value as a mapping in its own style.
    pub fn mapping(&self) -> String {
        self.mapping_as(self.flow)
    }

    /// The value as a mapping: block style (one entry per line) or flow style.
    pub fn mapping_as(&self, flow: bool) -> String {
        let mut out = String::new();
        if flow {
            render_flow_map(&self.entries, &mut out);
            out.push('\n');
            return out;
        }
        for (k, v) in &self.entries {
            render_key(k, &mut out);
            out.push(':');
            match v {
                Value::Scalar(s, style) => {
                    out.push(' ');
                    render_scalar(s, style, false, 0, &mut out);
                }
                other => {
                    out.push(' ');
                    render_flow(other, &mut out);
                }
            }
            out.push('\n');
        }
        out
    }

    /// The same mapping as the only entry of a list: block style `- ` with every following
    /// line shifted right by two, or flow style `[...]`.
    pub fn list(&self) -> String {
        let mapping = self.mapping();
        if self.flow {
            return format!("[{}]\n", mapping.trim_end());
        }
        format!("- {}", mapping.replace('\n', "\n  "))
    }

    /// Decoration that is the same around both forms.
    pub fn decorate(&self, body: &str) -> String {
        match self.decor {
            Decor::None => body.to_owned(),
            Decor::Comment => format!("# identity of the web container\n{body}# end\n"),
            Decor::DocumentStart => format!("---\n{body}"),
            Decor::DocumentEnd => format!("{body}...\n"),
            Decor::Directive => format!("%YAML 1.2\n---\n{body}"),
            Decor::ByteOrderMark => format!("\u{feff}{body}"),
            Decor::SecondDocument => format!("{body}---\ncert_dir: /other\n"),
            Decor::TrailingJunk => format!("{body}]\n"),
        }
    }

    /// Whether the entries use only what means the same in block and flow style.
    pub fn style_neutral(&self) -> bool {
        fn scalar_ok(s: &Scalar, style: &Style) -> bool {
            !matches!(s, Scalar::Text(_)) && matches!(style, Style::Single | Style::Double)
        }
        self.entries
            .iter()
            .all(|(_, v)| matches!(v, Value::Scalar(s, style) if scalar_ok(s, style)))
    }
}
