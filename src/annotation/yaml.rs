//! Reading the YAML value under a tight budget into the fields as written, types checked.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::budget::{BudgetBreach, EnforcingPolicy};
use serde_saphyr::granit_parser::ErrorKind;
use serde_saphyr::{Budget, DuplicateKeyPolicy, MergeKeyPolicy, Options};

use super::{
    AnnotationError, Attestation, FederatedBundles, Field, FieldProblem, Layout, MAX_VALUE_BYTES,
    OnFailure, YamlLimit,
};

// YAML budget. A valid value has 3 levels (list, mapping, audience list) and at most 48 nodes; the limits
// leave room for a wrong-typed value (so it is reported as a type error) and for a few anchors
// used for deduplication, but nothing that can amplify work.
const YAML_MAX_DEPTH: usize = 8;
const YAML_MAX_NODES: usize = 256;
const YAML_MAX_EVENTS: usize = 1024;
const YAML_MAX_ANCHORS: usize = 8;
const YAML_MAX_ALIASES: usize = 8;
const YAML_MAX_ALIAS_REPLAYED_EVENTS: usize = 64;
const YAML_MAX_ALIAS_REPLAY_DEPTH: usize = 2;
// Longest message text from the YAML library we are willing to echo back into an error.
const MAX_ECHOED_MESSAGE_CHARS: usize = 200;
// Longest unknown key we echo back.
const MAX_ECHOED_KEY_CHARS: usize = 64;

fn budget() -> Budget {
    let mut b = Budget::default();
    b.max_depth = YAML_MAX_DEPTH;
    // The scanner reads a whole flow collection ahead of the events the budget counts (it may
    // be a key), so deep flow nesting trips this limit first; see `precheck_budget`.
    b.flow_nesting_limit = YAML_MAX_DEPTH;
    b.max_nodes = YAML_MAX_NODES;
    b.max_events = YAML_MAX_EVENTS;
    b.max_anchors = YAML_MAX_ANCHORS;
    b.max_aliases = YAML_MAX_ALIASES;
    b.max_documents = 1;
    b.max_merge_keys = 0;
    b.max_total_scalar_bytes = MAX_VALUE_BYTES;
    b.max_recorded_anchor_events = YAML_MAX_EVENTS;
    b.max_recorded_anchor_bytes = MAX_VALUE_BYTES;
    b.max_inclusion_depth = 0;
    b
}

fn options() -> Options {
    let mut o = Options::default();
    o.budget = Some(budget());
    o.alias_limits.max_total_replayed_events = YAML_MAX_ALIAS_REPLAYED_EVENTS;
    o.alias_limits.max_replay_stack_depth = YAML_MAX_ALIAS_REPLAY_DEPTH;
    o.alias_limits.max_alias_expansions_per_anchor = YAML_MAX_ALIASES;
    // Our visitor sees repeated keys and reports them against the field.
    o.duplicate_keys = DuplicateKeyPolicy::PassThrough;
    o.merge_keys = MergeKeyPolicy::Error;
    o.reject_unsupported_tags = true;
    o.reject_tagged_field_names = true;
    // Snippets would copy parts of the hostile input into our error messages.
    o.with_snippet = false;
    o
}

/// The value without a last line that holds only spaces or tabs and no line break. YAML
/// libraries disagree on whether such a line adds a line break to a keep-chomped block scalar
/// that ends the document (libyaml: no; serde-saphyr: yes), and editors and `kubectl` add or
/// drop trailing indentation freely: without this, one value would mean two things.
pub(super) fn without_blank_last_line(value: &str) -> &str {
    match value.rfind(['\n', '\r']) {
        Some(i) if value[i + 1..].bytes().all(|b| b == b' ' || b == b'\t') => &value[..=i],
        _ => value,
    }
}

// The deserializer enforces the same budget while streaming, but only as far as it reads: a
// type error early in the value would stop it before a bomb later on is seen. Scanning the
// whole value first makes the refusal of hostile YAML not depend on where it sits.
pub(super) fn precheck_budget(value: &str) -> Result<(), AnnotationError> {
    let report =
        serde_saphyr::budget::check_yaml_budget(value, budget(), EnforcingPolicy::AllContent)
            .map_err(|e| match e.kind() {
                ErrorKind::RecursionLimitExceeded => AnnotationError::TooComplex {
                    limit: YamlLimit::Depth,
                },
                _ => AnnotationError::Syntax {
                    message: sanitize(&e.to_string(), MAX_ECHOED_MESSAGE_CHARS),
                },
            })?;
    if let Some(breach) = &report.breached {
        return Err(AnnotationError::TooComplex {
            limit: limit_of(breach),
        });
    }
    if report.nodes == 0 {
        // Only comments or document markers.
        return Err(AnnotationError::Empty);
    }
    Ok(())
}

fn limit_of(breach: &BudgetBreach) -> YamlLimit {
    match breach {
        BudgetBreach::Depth { .. } => YamlLimit::Depth,
        BudgetBreach::Nodes { .. } => YamlLimit::Nodes,
        BudgetBreach::Events { .. } => YamlLimit::Events,
        BudgetBreach::Anchors { .. } => YamlLimit::Anchors,
        BudgetBreach::Aliases { .. } | BudgetBreach::AliasAnchorRatio { .. } => YamlLimit::Aliases,
        BudgetBreach::RecordedAnchorEvents { .. } | BudgetBreach::RecordedAnchorBytes { .. } => {
            YamlLimit::AliasExpansion
        }
        BudgetBreach::Documents { .. } => YamlLimit::Documents,
        BudgetBreach::MergeKeys { .. } => YamlLimit::MergeKeys,
        BudgetBreach::ScalarBytes { .. } => YamlLimit::ScalarBytes,
        _ => YamlLimit::Other,
    }
}

/// Escapes control characters and truncates, so text derived from the input is safe to log.
fn sanitize(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The value as written, types checked but nothing else.
#[derive(Debug, Default)]
pub(super) struct RawSpec {
    pub(super) spire_agent_address: Option<String>,
    pub(super) cert_dir: Option<String>,
    pub(super) svid_file_name: Option<String>,
    pub(super) svid_key_file_name: Option<String>,
    pub(super) svid_bundle_file_name: Option<String>,
    pub(super) credential_bundle_file_name: Option<String>,
    pub(super) hint: Option<String>,
    pub(super) spiffe_id: Option<String>,
    pub(super) cert_file_mode: Option<String>,
    pub(super) key_file_mode: Option<String>,
    pub(super) bundle_file_mode: Option<String>,
    pub(super) on_failure: Option<OnFailure>,
    pub(super) layout: Option<Layout>,
    pub(super) federated_bundles: Option<FederatedBundles>,
    pub(super) attestation: Option<Attestation>,
    pub(super) copy_once: Option<bool>,
    pub(super) jwt_audience: Option<Vec<String>>,
    pub(super) jwt_svid_file_name: Option<String>,
    pub(super) jwt_bundle_file_name: Option<String>,
}

/// Where the deserializer was when it failed. serde errors carry no field path, and the
/// visitors can only return the library's error type, so they record here what went wrong
/// and the caller turns it into an [`AnnotationError`].
#[derive(Debug, Default)]
struct Tracker {
    field: Option<Field>,
    reading_key: bool,
    problem: Option<AnnotationError>,
}

impl Tracker {
    fn fail<E: de::Error>(&mut self, problem: AnnotationError) -> E {
        let e = E::custom(&problem);
        self.problem = Some(problem);
        e
    }
}

pub(super) fn deserialize(value: &str) -> Result<RawSpec, AnnotationError> {
    let mut tracker = Tracker::default();
    let result = serde_saphyr::with_deserializer_from_str_with_options(value, options(), |de| {
        DocumentSeed {
            tracker: &mut tracker,
        }
        .deserialize(de)
    });
    result.map_err(|e| classify(&e, tracker))
}

fn classify(error: &serde_saphyr::Error, tracker: Tracker) -> AnnotationError {
    use serde_saphyr::Error as E;
    if let Some(problem) = tracker.problem {
        return problem;
    }
    let error = unwrap_error(error);
    match error {
        E::Budget { breach, .. } => AnnotationError::TooComplex {
            limit: limit_of(breach),
        },
        E::AliasReplayCounterOverflow { .. }
        | E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. } => AnnotationError::TooComplex {
            limit: YamlLimit::AliasExpansion,
        },
        E::MergeKeyNotAllowed { .. } => AnnotationError::TooComplex {
            limit: YamlLimit::MergeKeys,
        },
        E::MultipleDocuments { .. } => AnnotationError::TooComplex {
            limit: YamlLimit::Documents,
        },
        E::UnsupportedTag { .. } | E::TaggedStructFieldName { .. } => match tracker.field {
            Some(field) => AnnotationError::field(field, FieldProblem::UnsupportedTag),
            None => AnnotationError::Syntax {
                message: "unsupported yaml tag".to_owned(),
            },
        },
        _ if tracker.reading_key => AnnotationError::InvalidKey,
        _ => match tracker.field {
            Some(field) => AnnotationError::field(
                field,
                FieldProblem::WrongType {
                    expected: field.expected(),
                },
            ),
            None => match error {
                E::SerdeInvalidType { .. }
                | E::SerdeInvalidValue { .. }
                | E::Unexpected { .. }
                | E::NullIntoString { .. }
                | E::InvalidScalar { .. }
                | E::Eof { .. } => AnnotationError::NotAMapping,
                other => AnnotationError::Syntax {
                    message: sanitize(&other.to_string(), MAX_ECHOED_MESSAGE_CHARS),
                },
            },
        },
    }
}

fn unwrap_error(error: &serde_saphyr::Error) -> &serde_saphyr::Error {
    match error.without_snippet() {
        serde_saphyr::Error::AliasError { error, .. } => unwrap_error(error),
        other => other,
    }
}

/// The whole value: a mapping, or a list of exactly one mapping.
struct DocumentSeed<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = RawSpec;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RawSpec, D::Error> {
        d.deserialize_any(DocumentVisitor {
            tracker: self.tracker,
        })
    }
}

struct DocumentVisitor<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> Visitor<'de> for DocumentVisitor<'_> {
    type Value = RawSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a list of one mapping")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawSpec, A::Error> {
        let Some(raw) = seq.next_element_seed(SpecSeed {
            tracker: &mut *self.tracker,
        })?
        else {
            return Err(self.tracker.fail(AnnotationError::EmptyList));
        };
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(self.tracker.fail(AnnotationError::TooManyEntries));
        }
        Ok(raw)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawSpec, A::Error> {
        SpecVisitor {
            tracker: self.tracker,
        }
        .visit_map(map)
    }
}

struct SpecSeed<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> DeserializeSeed<'de> for SpecSeed<'_> {
    type Value = RawSpec;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RawSpec, D::Error> {
        d.deserialize_map(SpecVisitor {
            tracker: self.tracker,
        })
    }
}

struct SpecVisitor<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> Visitor<'de> for SpecVisitor<'_> {
    type Value = RawSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSpec, A::Error> {
        let t = self.tracker;
        let mut raw = RawSpec::default();
        let mut seen = BTreeSet::new();
        loop {
            t.reading_key = true;
            let key: Option<String> = map.next_key()?;
            t.reading_key = false;
            let Some(key) = key else { break };
            let Some(field) = Field::from_key(&key) else {
                return Err(t.fail(AnnotationError::UnknownField {
                    key: sanitize(&key, MAX_ECHOED_KEY_CHARS),
                }));
            };
            if !seen.insert(field) {
                return Err(t.fail(AnnotationError::field(field, FieldProblem::Repeated)));
            }
            t.field = Some(field);
            match field {
                Field::SpireAgentAddress => raw.spire_agent_address = map.next_value()?,
                Field::CertDir => raw.cert_dir = map.next_value()?,
                Field::SvidFileName => raw.svid_file_name = map.next_value()?,
                Field::SvidKeyFileName => raw.svid_key_file_name = map.next_value()?,
                Field::SvidBundleFileName => raw.svid_bundle_file_name = map.next_value()?,
                Field::CredentialBundleFileName => {
                    raw.credential_bundle_file_name = map.next_value()?;
                }
                Field::Hint => raw.hint = map.next_value()?,
                Field::SpiffeId => raw.spiffe_id = map.next_value()?,
                Field::CertFileMode => raw.cert_file_mode = map.next_value()?,
                Field::KeyFileMode => raw.key_file_mode = map.next_value()?,
                Field::BundleFileMode => raw.bundle_file_mode = map.next_value()?,
                Field::OnFailure => raw.on_failure = map.next_value()?,
                Field::Layout => raw.layout = map.next_value()?,
                Field::FederatedBundles => raw.federated_bundles = map.next_value()?,
                Field::Attestation => raw.attestation = map.next_value()?,
                Field::CopyOnce => raw.copy_once = map.next_value()?,
                Field::JwtAudience => raw.jwt_audience = map.next_value()?,
                Field::JwtSvidFileName => raw.jwt_svid_file_name = map.next_value()?,
                Field::JwtBundleFileName => raw.jwt_bundle_file_name = map.next_value()?,
            }
            t.field = None;
        }
        Ok(raw)
    }
}
