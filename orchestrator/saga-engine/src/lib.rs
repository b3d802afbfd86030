//! The saga engine: definitions and the saga state machine, with no I/O.
//!
//! - [`definition`]: YAML definitions parsed and compiled into a validated [`Plan`], every
//!   error reported with file, line and step.
//! - [`template`]: the `${...}` request mappings over the saga input and step outputs.
//! - [`saga`]: the state machine. A saga's state is a fold of its events; [`Saga::next`]
//!   says what to do next and [`Saga::on_result`] turns a call's outcome into an event.
//!   Time, ids and randomness come in as arguments, so every decision is replayable.
//!
//! Nothing here touches the network, the disk or the clock: the runtime does that.

pub mod definition;
pub mod duration;
pub mod saga;
pub mod template;

pub use definition::{DefinitionError, DefinitionErrors, DescriptorLookup, Plan, StepKind};
pub use saga::{
    CallError, Event, EventKind, Next, Phase, Saga, SagaStatus, SignalOutcome, SignalRefused,
    StepStatus, Wait,
};
