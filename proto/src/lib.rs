//! The protobuf contracts of the project, generated at build time without `protoc`.
//!
//! - [`saga::v1`]: the orchestrator's client API (`saga.v1.SagaOrchestrator`).
//! - [`payment::v1`], [`store::v1`], [`rider::v1`]: the food-delivery participants.
//! - [`participant::v1`]: the ledger types every participant shares.
//! - [`notifier::v1`]: the notifier, which turns the orchestrator's change feed into
//!   notifications.
//! - [`FILE_DESCRIPTOR_SET`]: every file above (and the well-known types it imports) as an
//!   encoded `FileDescriptorSet`, for server reflection and dynamic invocation.

/// The encoded `FileDescriptorSet` of every .proto file in this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod saga {
    pub mod v1 {
        tonic::include_proto!("saga.v1");
    }
}

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod participant {
    pub mod v1 {
        tonic::include_proto!("participant.v1");
    }
}

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod payment {
    pub mod v1 {
        tonic::include_proto!("payment.v1");
    }
}

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod store {
    pub mod v1 {
        tonic::include_proto!("store.v1");
    }
}

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod rider {
    pub mod v1 {
        tonic::include_proto!("rider.v1");
    }
}

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod notifier {
    pub mod v1 {
        tonic::include_proto!("notifier.v1");
    }
}
