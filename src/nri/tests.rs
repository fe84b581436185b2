use std::error::Error as _;
use std::path::PathBuf;

use super::*;
use crate::artifacts::ArtifactError;
use crate::host::HostError;

fn for_container(error: EngineError) -> ContainerError {
    ContainerError {
        namespace: "default".into(),
        pod: "web".into(),
        container: "c0".into(),
        error: Box::new(error),
    }
}

fn agent(error: SourceError) -> EngineError {
    EngineError::Agent {
        agent: PathBuf::from("/run/spire/admin/admin.sock"),
        error,
    }
}

#[test]
fn a_nested_cause_is_in_the_message_exactly_once() {
    let e = for_container(EngineError::Artifacts(ArtifactError::CreateDir {
        pod_uid: "uid-1".into(),
        container_id: "ctr-1".into(),
        error: HostError::Io {
            op: "creating",
            path: "/run/nri-identity-injector/uid-1".into(),
            error: std::io::Error::from_raw_os_error(24),
        },
    }));
    let s = status(&e);
    assert_eq!(s.code, Code::Internal);
    assert!(
        s.message
            .starts_with("nri-identity-injector: pod default/web container c0: creating the artifact directory for pod uid-1 container ctr-1: creating /run/nri-identity-injector/uid-1: "),
        "{}",
        s.message
    );
    assert_eq!(
        s.message.matches("Too many open files").count(),
        1,
        "{}",
        s.message
    );
    // Printed, so not also exposed: a chain printer would say it twice.
    assert!(e.source().is_none());
}

#[test]
fn the_agents_code_reaches_the_runtime() {
    let refused = |code, message: &str| {
        agent(SourceError::Status {
            code,
            message: message.into(),
        })
    };
    let cases = [
        (
            refused(tonic::Code::PermissionDenied, "not an authorized delegate"),
            Code::PermissionDenied,
        ),
        (
            refused(tonic::Code::InvalidArgument, "bad selectors"),
            Code::InvalidArgument,
        ),
        (
            refused(tonic::Code::Unavailable, "attestation"),
            Code::Unavailable,
        ),
        (refused(tonic::Code::Ok, "odd"), Code::Unknown),
        (agent(SourceError::StreamEnded), Code::Unavailable),
        (
            agent(SourceError::InvalidWorkload("PID must be positive")),
            Code::FailedPrecondition,
        ),
    ];
    for (error, code) in cases {
        let e = for_container(error);
        let s = status(&e);
        assert_eq!(s.code, code, "{}", s.message);
        if let EngineError::Agent {
            error: SourceError::Status { message, .. },
            ..
        } = &*e.error
        {
            assert_eq!(
                s.message.matches(message.as_str()).count(),
                1,
                "{}",
                s.message
            );
        }
    }
}

#[test]
fn a_refused_runtime_is_a_failed_precondition() {
    let s = runtime_status(&RuntimeError::Unknown {
        name: "docker".into(),
    });
    assert_eq!(s.code, Code::FailedPrecondition);
    assert!(s.message.contains("\"docker\""), "{}", s.message);
}
