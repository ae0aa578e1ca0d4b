//! fleet's immutable host image: the update agent's parts. A release ([`release`]) is signed and
//! verified before anything is written; [`slots`] writes it to the slot not running and adds a
//! boot entry with one try; [`boot`] is the boot-counting model (systemd-boot's and
//! systemd-bless-boot's rules) that turns a failed boot into a rollback; [`update_agent`] is the
//! service that ties them together with FleetLock, one machine of the cluster at a time. `host-image/build` makes
//! releases; docs/host-image.md describes the layout and the trust chain. It must not depend on
//! the engine or the agent: the image runs them as programs, and talks FleetLock over HTTP.

pub mod boot;
pub mod channel;
pub mod fleetlock;
pub mod provision;
pub mod release;
pub mod slots;
pub mod update_agent;
