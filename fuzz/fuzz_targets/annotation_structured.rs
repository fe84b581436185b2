//! Structure-aware annotation values: mappings built from the real field names and the values
//! that matter to them (paths, names, modes, enum words, SPIFFE IDs, wrong types), in every
//! YAML quoting style, with anchors, aliases, tags, merge keys and decoration, plus the
//! annotation keys of a pod (container keys, the pod key, lookalikes).
//!
//! Holds, besides the properties of the `annotation` target: a mapping and the same mapping as
//! a one-entry list mean the same; block and flow style mean the same where the scalars do;
//! the container key wins over the pod key, and no other key is ever used.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nri_identity_injector::annotation::{
    self, AnnotationError, CONTAINER_KEY_PREFIX, POD_KEY, PodRef,
};
use nri_identity_injector_fuzz::annotation::{Annotation, check_error, check_request, policy};

#[derive(Arbitrary, Debug)]
enum KeyPick {
    Container(u8),
    Pod,
    PodLookalike(u8),
    ContainerLookalike(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    value: Annotation,
    /// Other annotations of the pod: which key, and whether it holds the value or junk.
    keys: Vec<(KeyPick, bool)>,
    container: u8,
}

const CONTAINERS: &[&str] = &["web", "sidecar", "web ", "Web", "", "web/x", "pod"];
const POD_LOOKALIKES: &[&str] = &[
    "identity.noderesource.dev/pod ",
    "identity.noderesource.dev/Pod",
    "identity.noderesource.dev/pods",
    "identity.noderesource.dev/container.",
    "identity.noderesource.dev/container",
];
const CONTAINER_LOOKALIKES: &[&str] = &[
    "identity.noderesource.dev/containers.web",
    "identity.noderesource.dev/container.web.",
    "Identity.noderesource.dev/container.web",
    "identity.noderesource.dev/container..web",
    "identity.noderesource.dev/container.web/pod",
];

fn name(i: u8) -> &'static str {
    CONTAINERS[usize::from(i) % CONTAINERS.len()]
}

fn comparable(r: &Result<annotation::IdentityRequest, AnnotationError>) -> bool {
    // Positions in syntax messages, and budgets counting the list's own nodes, legitimately
    // differ between two spellings of one value.
    !matches!(
        r,
        Err(AnnotationError::Syntax { .. }
            | AnnotationError::TooComplex { .. }
            | AnnotationError::TooLarge { .. })
    )
}

fn same(a: &str, b: &str) {
    let policy = policy();
    let (ra, rb) = (annotation::parse(a, &policy), annotation::parse(b, &policy));
    for (r, v) in [(&ra, a), (&rb, b)] {
        match r {
            Ok(request) => check_request(request, &policy, &v),
            Err(error) => check_error(error, &v),
        }
    }
    if comparable(&ra) && comparable(&rb) {
        assert_eq!(ra, rb, "{a:?} and {b:?} mean different things");
    }
}

fuzz_target!(|input: Input| {
    let v = &input.value;
    let mapping = v.decorate(&v.mapping());
    if !v.entries.is_empty() {
        same(&mapping, &v.decorate(&v.list()));
        if v.style_neutral() {
            same(&mapping, &v.decorate(&v.mapping_as(!v.flow)));
        }
    } else {
        same(&mapping, &mapping);
    }

    // Lookup: only the container's own key or the pod key is ever used, the container's first.
    let container = name(input.container);
    let own_key = format!("{CONTAINER_KEY_PREFIX}{container}");
    let mut annotations = std::collections::BTreeMap::new();
    for (pick, holds_value) in &input.keys {
        let key = match pick {
            KeyPick::Container(i) => format!("{CONTAINER_KEY_PREFIX}{}", name(*i)),
            KeyPick::Pod => POD_KEY.to_owned(),
            KeyPick::PodLookalike(i) => {
                POD_LOOKALIKES[usize::from(*i) % POD_LOOKALIKES.len()].to_owned()
            }
            KeyPick::ContainerLookalike(i) => {
                CONTAINER_LOOKALIKES[usize::from(*i) % CONTAINER_LOOKALIKES.len()].to_owned()
            }
        };
        let value = if *holds_value {
            mapping.clone()
        } else {
            "cert_dir: /junk\n".to_owned()
        };
        annotations.insert(key, value);
    }
    let pod = PodRef {
        namespace: "default",
        name: "p",
    };
    let expected_key = if annotations.contains_key(&own_key) {
        Some(own_key.as_str())
    } else if annotations.contains_key(POD_KEY) {
        Some(POD_KEY)
    } else {
        None
    };
    let found = annotation::lookup(&annotations, container);
    assert_eq!(
        found.map(|(k, _)| k),
        expected_key,
        "lookup for {container:?}"
    );
    let policy = policy();
    let result = annotation::request_for_container(&annotations, pod, container, &policy);
    match (expected_key, result) {
        (None, Ok(None)) => {}
        (Some(key), Ok(Some(request))) => {
            assert_eq!(Ok(request), annotation::parse(&annotations[key], &policy));
        }
        (Some(key), Err(e)) => {
            assert_eq!(e.key, key);
            assert_eq!(e.container, container);
            assert_eq!(
                Err(e.error.clone()),
                annotation::parse(&annotations[key], &policy)
            );
        }
        (expected, got) => panic!("expected key {expected:?}, got {got:?}"),
    }
});
