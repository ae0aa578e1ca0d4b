//! fleet's way to etcd, the same from every process: connecting with timeouts and TLS client
//! certificates (`tls`), retrying what is worth retrying (`retry`, `etcd::is_transient`), and
//! following a prefix through etcd's watch (`etcd::follow_prefix`); and the seam components are
//! being moved onto (`kv`): a narrow `Store` trait with etcd and an in-memory, fault-injecting
//! implementation for unit tests.
//!
//! What etcd stores, and under which keys, is `fleet-model`'s: this crate moves bytes (it uses
//! the model only to read a machine id out of a certificate's name). It must not depend on the
//! engine, the agent or HTTP; fleetctl, a REST client, does not depend on it (nor on gRPC).

pub mod etcd;
pub mod kv;
pub mod retry;
pub mod tls;
