//! Benchmark 4: what one kubelet pod list costs selectors mode as the node fills up, from 0 to
//! 110 pods (Kubernetes' default maximum per node). The real client (`KubeletPods::refresh`:
//! connect, HTTP/1.1 GET `/pods`, read, parse, keep the facts) against an in-process server on
//! the read-only port's plain HTTP, answering with pods shaped as a kubelet v1.34 lists them:
//! metadata with labels, annotations, owner references and managed fields, two containers
//! with environment, probes, resources and mounts, a projected token volume, and a full status.
//! The secure port adds a TLS handshake per list (see `make bench-k8s`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use nri_identity_injector::k8s::{Endpoint, KubeletPods};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bed::{Summary, summarize, us};

pub struct Point {
    pub pods: usize,
    pub bytes: usize,
    pub list: Summary,
}

/// One pod of a Deployment, as a kubelet's `/pods` shows it.
fn pod(i: usize) -> Value {
    let name = format!("web-7d9f8c6b5-{i:05x}");
    let uid = format!("5b1c{i:04x}-0f3e-4c2a-9d7b-3e8f2a1c{i:04x}");
    let ts = "2026-12-03T10:00:00Z";
    let container = |n: &str, image: &str| {
        json!({
            "name": n, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["/app/server"], "args": ["--port=8080", "--log-level=info"],
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                {"name": "LOG_FORMAT", "value": "json"},
                {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}}
            ],
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app", "readOnly": true},
                {"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}
            ],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": true, "runAsNonRoot": true}
        })
    };
    let status = |n: &str, image: &str| {
        json!({
            "name": n, "state": {"running": {"startedAt": ts}}, "lastState": {}, "ready": true,
            "restartCount": 0, "image": image,
            "imageID": format!("{image}@sha256:{}", "ab".repeat(32)),
            "containerID": format!("containerd://{:064x}", i * 2 + n.len()), "started": true,
            "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true, "recursiveReadOnly": "Disabled"}]
        })
    };
    let conditions: Vec<Value> = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .map(|t| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": ts}))
    .into();
    json!({
        "metadata": {
            "name": name, "generateName": "web-7d9f8c6b5-", "namespace": "shop", "uid": uid,
            "resourceVersion": format!("{}", 1_000_000 + i), "creationTimestamp": ts,
            "labels": {"app.kubernetes.io/name": "web", "app.kubernetes.io/part-of": "shop", "pod-template-hash": "7d9f8c6b5", "version": "v2"},
            "annotations": {"kubernetes.io/config.seen": "2026-12-03T10:00:00.123456789Z", "kubernetes.io/config.source": "api",
                "identity.noderesource.dev/container.app": "cert_dir: /var/run/secrets/spiffe\n"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5", "uid": "0a1b2c3d-4e5f-6789-abcd-ef0123456789", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}}, "f:ownerReferences": {".": {}, "k:{\"uid\":\"0a1b2c3d-4e5f-6789-abcd-ef0123456789\"}": {}}},
                              "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}}}, "f:serviceAccountName": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config", "defaultMode": 420}},
                {"name": "kube-api-access-x7k2p", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ], "defaultMode": 420}}
            ],
            "containers": [container("app", "registry.example/shop/web:2.4.1"), container("proxy", "registry.example/shop/proxy:1.9.0")],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web", "serviceAccount": "web", "nodeName": "node-1",
            "securityContext": {"runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running",
            "conditions": conditions,
            "hostIP": "10.0.0.11", "hostIPs": [{"ip": "10.0.0.11"}],
            "podIP": format!("10.244.{}.{}", i / 250, i % 250 + 2), "podIPs": [{"ip": format!("10.244.{}.{}", i / 250, i % 250 + 2)}],
            "startTime": ts,
            "containerStatuses": [status("app", "registry.example/shop/web:2.4.1"), status("proxy", "registry.example/shop/proxy:1.9.0")],
            "qosClass": "Burstable"
        }
    })
}

/// The pod list of `n` pods, as bytes.
pub fn pod_list(n: usize) -> Vec<u8> {
    let list = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": (0..n).map(pod).collect::<Vec<_>>()});
    serde_json::to_vec(&list).expect("a JSON value serializes")
}

/// Lists `reps` times at each pod count in `counts`.
pub async fn cost(counts: &[usize], reps: usize) -> Vec<Point> {
    let body: Arc<Mutex<Arc<Vec<u8>>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::clone(&body);
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = Arc::clone(&served.lock().unwrap());
            tokio::spawn(async move {
                // The request is small and comes in one piece; its end is all that matters.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    let url = format!("http://127.0.0.1:{port}").parse().unwrap();
    let kubelet = KubeletPods::new(Endpoint::read_only(url));
    let mut points = Vec::new();
    for &n in counts {
        let list = Arc::new(pod_list(n));
        let bytes = list.len();
        *body.lock().unwrap() = list;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let got = kubelet.refresh().await.expect("the fake kubelet answers");
            times.push(us(t.elapsed()));
            assert_eq!(got, n, "every pod of the list is kept");
        }
        points.push(Point {
            pods: n,
            bytes,
            list: summarize(&times),
        });
    }
    server.abort();
    points
}
