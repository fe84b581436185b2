//! The NRI protocol types (generated from `proto/nri.proto`) and the event vocabulary.

/// Messages of `nri.pkg.api.v1alpha1`, generated from our schema subset.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1alpha1 {
    include!("generated/nri.pkg.api.v1alpha1.rs");
}

/// The ttrpc envelope messages.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub(crate) mod ttrpc {
    include!("generated/ttrpc.rs");
}

pub use v1alpha1::{
    Container, ContainerAdjustment, ContainerEviction, ContainerUpdate, Hook, Hooks, KeyValue,
    Mount, PodSandbox, User,
};

/// Full service names as they appear on the wire.
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";

/// The NRI version this crate implements, sent in RegisterPlugin.
pub const NRI_VERSION: &str = "v0.12.2";

/// A lifecycle event a plugin can subscribe to. Values are the wire values of `api.Event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Event {
    RunPodSandbox = 1,
    StopPodSandbox = 2,
    RemovePodSandbox = 3,
    CreateContainer = 4,
    PostCreateContainer = 5,
    StartContainer = 6,
    PostStartContainer = 7,
    UpdateContainer = 8,
    PostUpdateContainer = 9,
    StopContainer = 10,
    RemoveContainer = 11,
    UpdatePodSandbox = 12,
    PostUpdatePodSandbox = 13,
}

impl Event {
    pub const ALL: [Event; 13] = [
        Event::RunPodSandbox,
        Event::StopPodSandbox,
        Event::RemovePodSandbox,
        Event::CreateContainer,
        Event::PostCreateContainer,
        Event::StartContainer,
        Event::PostStartContainer,
        Event::UpdateContainer,
        Event::PostUpdateContainer,
        Event::StopContainer,
        Event::RemoveContainer,
        Event::UpdatePodSandbox,
        Event::PostUpdatePodSandbox,
    ];

    /// The event for a wire value, if it is one a plugin can handle.
    pub fn from_wire(value: i32) -> Option<Event> {
        Event::ALL.into_iter().find(|e| *e as i32 == value)
    }

    /// The bit of this event in `ConfigureResponse.events`.
    pub const fn bit(self) -> u32 {
        1 << (self as u32 - 1)
    }

    /// The dedicated Plugin-service method (NRI v0.12) that carries this event.
    pub const fn method(self) -> &'static str {
        match self {
            Event::RunPodSandbox => "RunPodSandbox",
            Event::StopPodSandbox => "StopPodSandbox",
            Event::RemovePodSandbox => "RemovePodSandbox",
            Event::CreateContainer => "CreateContainer",
            Event::PostCreateContainer => "PostCreateContainer",
            Event::StartContainer => "StartContainer",
            Event::PostStartContainer => "PostStartContainer",
            Event::UpdateContainer => "UpdateContainer",
            Event::PostUpdateContainer => "PostUpdateContainer",
            Event::StopContainer => "StopContainer",
            Event::RemoveContainer => "RemoveContainer",
            Event::UpdatePodSandbox => "UpdatePodSandbox",
            Event::PostUpdatePodSandbox => "PostUpdatePodSandbox",
        }
    }

    pub fn from_method(method: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.method() == method)
    }
}

/// A set of events, as subscribed in Configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventSet(u32);

/// Events every NRI runtime since v0.6 accepts in a subscription (`RemoveContainer` and below).
/// Older runtimes fail Configure with "invalid plugin events" for any bit above these.
pub const EVENTS_SINCE_V0_6: u32 = 0x7FF;
/// Events accepted from NRI v0.10 on (containerd 2.2, CRI-O 1.34).
pub const EVENTS_SINCE_V0_10: u32 = 0x1FFF;

impl EventSet {
    pub const fn empty() -> Self {
        EventSet(0)
    }

    pub fn of(events: &[Event]) -> Self {
        EventSet(events.iter().fold(0, |acc, e| acc | e.bit()))
    }

    pub const fn contains(self, event: Event) -> bool {
        self.0 & event.bit() != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub fn with(self, event: Event) -> Self {
        EventSet(self.0 | event.bit())
    }

    pub fn iter(self) -> impl Iterator<Item = Event> {
        Event::ALL.into_iter().filter(move |e| self.contains(*e))
    }

    /// The mask to send to a runtime that accepts `valid` bits.
    ///
    /// Never 0: the runtime reads 0 as "subscribe to everything". A plugin with no event
    /// handlers therefore subscribes to RemovePodSandbox alone, whose default handler does
    /// nothing.
    pub fn wire_mask(self, valid: u32) -> i32 {
        let mask = self.0 & valid;
        let mask = if mask == 0 {
            Event::RemovePodSandbox.bit()
        } else {
            mask
        };
        mask as i32
    }
}

impl FromIterator<Event> for EventSet {
    fn from_iter<I: IntoIterator<Item = Event>>(iter: I) -> Self {
        iter.into_iter().fold(EventSet::empty(), EventSet::with)
    }
}

/// Which events a runtime accepts, from what Configure tells about it.
///
/// `NRI_version` exists only from v0.12; older runtimes are recognised by name and version
/// (containerd 2.2 and CRI-O 1.34 brought NRI v0.10). Anything unrecognised gets the
/// conservative v0.6 set, which every runtime accepts.
pub fn valid_events(nri_version: &str, runtime_name: &str, runtime_version: &str) -> u32 {
    // Runtimes built without module information report "0.0.0-unknown": not a version.
    if let Some((major, minor)) = parse_version(nri_version).filter(|v| *v != (0, 0)) {
        return if (major, minor) >= (0, 10) {
            EVENTS_SINCE_V0_10
        } else {
            EVENTS_SINCE_V0_6
        };
    }
    let threshold = match runtime_name {
        "containerd" => (2, 2),
        "cri-o" => (1, 34),
        _ => return EVENTS_SINCE_V0_6,
    };
    match parse_version(runtime_version) {
        Some(v) if v >= threshold => EVENTS_SINCE_V0_10,
        _ => EVENTS_SINCE_V0_6,
    }
}

/// `v1.2.3`, `1.2.3+unknown`, `2.3.4-rc.1` → (major, minor).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_bits_follow_the_wire_enum() {
        assert_eq!(Event::RunPodSandbox.bit(), 0x1);
        assert_eq!(Event::CreateContainer.bit(), 0x8);
        assert_eq!(Event::StartContainer.bit(), 0x20);
        assert_eq!(Event::RemoveContainer.bit(), 0x400);
        assert_eq!(Event::PostUpdatePodSandbox.bit(), 0x1000);
        for e in Event::ALL {
            assert_eq!(Event::from_wire(e as i32), Some(e));
            assert_eq!(Event::from_method(e.method()), Some(e));
        }
        assert_eq!(Event::from_wire(0), None);
        assert_eq!(
            Event::from_wire(14),
            None,
            "ValidateContainerAdjustment is not handled"
        );
    }

    #[test]
    fn mask_is_never_zero_because_zero_means_everything() {
        assert_eq!(EventSet::empty().wire_mask(EVENTS_SINCE_V0_6), 0x4);
        let only_new = EventSet::of(&[Event::UpdatePodSandbox]);
        assert_eq!(only_new.wire_mask(EVENTS_SINCE_V0_6), 0x4);
    }

    #[test]
    fn mask_keeps_within_what_old_runtimes_accept() {
        let set = EventSet::of(&[Event::CreateContainer, Event::UpdatePodSandbox]);
        assert_eq!(set.wire_mask(EVENTS_SINCE_V0_6), 0x8);
        assert_eq!(set.wire_mask(EVENTS_SINCE_V0_10), 0x808);
    }

    #[test]
    fn valid_events_by_runtime_version() {
        assert_eq!(
            valid_events("v0.12.0", "containerd", "2.3.4"),
            EVENTS_SINCE_V0_10
        );
        assert_eq!(valid_events("v0.9.1", "", ""), EVENTS_SINCE_V0_6);
        assert_eq!(valid_events("", "containerd", "v2.0.5"), EVENTS_SINCE_V0_6);
        assert_eq!(
            valid_events("", "containerd", "2.2.1+unknown"),
            EVENTS_SINCE_V0_10
        );
        assert_eq!(valid_events("", "cri-o", "1.33.2"), EVENTS_SINCE_V0_6);
        assert_eq!(valid_events("", "cri-o", "1.36.0"), EVENTS_SINCE_V0_10);
        assert_eq!(valid_events("", "other", "9.9"), EVENTS_SINCE_V0_6);
        assert_eq!(
            valid_events("unknown", "containerd", "garbage"),
            EVENTS_SINCE_V0_6
        );
    }
}
