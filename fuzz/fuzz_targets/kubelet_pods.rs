//! The kubelet's pod list (JSON) as selectors mode reads it, independent of how it was
//! fetched, and the selectors derived from each pod's facts.
//!
//! Holds: no panic (serde_json's recursion limit bounds nesting); every pod kept has a UID;
//! what was read, written back as a pod list, reads back the same; the selectors derived
//! from any pod's facts are sorted, unique, of type `k8s`, and never have an empty value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::k8s::attestor::{self, K8sWorkload};
use nri_identity_injector::k8s::kubelet_fuzzing::pod_list;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(pods) = pod_list(data) else { return };
    let mut items = Vec::new();
    for (uid, facts) in &pods {
        assert!(!uid.is_empty());
        items.push(json!({
            "metadata": {
                "uid": uid,
                "labels": facts.labels,
                "ownerReferences": facts.owners.iter().map(|o| json!({
                    "kind": o.kind, "name": o.name, "uid": o.uid,
                })).collect::<Vec<_>>(),
            },
            "spec": {
                "serviceAccountName": facts.service_account,
                "nodeName": facts.node_name,
                "ephemeralContainers": facts.ephemeral_containers.iter()
                    .map(|n| json!({"name": n})).collect::<Vec<_>>(),
            },
        }));
        let workload = K8sWorkload {
            namespace: "default".into(),
            pod_name: "web".into(),
            pod_uid: uid.clone(),
            pod_labels: facts.labels.clone(),
            service_account: Some(facts.service_account.clone()),
            container_name: "app".into(),
            image: Some("registry.example/app:1".into()),
            node_name: Some(facts.node_name.clone()).filter(|n| !n.is_empty()),
            owner_references: Some(facts.owners.clone()),
        };
        if let Ok(derived) = attestor::selectors(&workload) {
            let s = &derived.selectors;
            assert!(
                s.windows(2).all(|w| w[0] < w[1]),
                "not sorted and unique: {s:?}"
            );
            assert!(
                s.iter()
                    .all(|x| x.kind == attestor::SELECTOR_TYPE && !x.value.is_empty())
            );
        }
    }
    let body = json!({"kind": "PodList", "items": items}).to_string();
    assert_eq!(
        pod_list(body.as_bytes()).as_ref(),
        Ok(&pods),
        "round trip of {body}"
    );
});
