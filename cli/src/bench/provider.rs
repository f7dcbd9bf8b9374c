//! A transport under test, as a row provider: its name, its raw baseline, its workloads, its availability.
//!
//! A new transport joins `switchyard bench` by implementing [`Provider`] and
//! adding itself to [`crate::bench::providers`].

use std::fmt;

use futures_util::future::BoxFuture;

use super::measure::{BenchResult, RunConfig, Sample};

/// The workloads every provider is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// One producer, one consumer, as fast as the consumer takes them, through a declared sender.
    OneWay,
    /// The same with a plain `Node::send` per message (target looked up in the node's route cache).
    OneWaySend,
    /// Closed-loop request and answer between two machines.
    PingPong,
    /// One publisher, N topic subscribers; each message reaches all of them.
    FanOut,
    /// One producer, N workers of one type; each message reaches one of them.
    AnyOfType,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 5] = [
        Workload::OneWay,
        Workload::OneWaySend,
        Workload::PingPong,
        Workload::FanOut,
        Workload::AnyOfType,
    ];

    /// The name used in the table and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Workload::OneWay => "one-way",
            Workload::OneWaySend => "one-way send",
            Workload::PingPong => "ping-pong",
            Workload::FanOut => "fan-out",
            Workload::AnyOfType => "any-of-type",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which side of a comparison runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The raw library underneath the transport.
    Raw,
    /// Switchyard, through `Node` and the selector.
    Ours,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Raw => "raw",
            Side::Ours => "ours",
        })
    }
}

/// One transport under test.
pub trait Provider: Send + Sync {
    /// The transport's name, as in `Envelope::carried_by` and `--transports`.
    fn name(&self) -> &'static str;
    /// What the raw baseline is, for the report.
    fn baseline(&self) -> &'static str;
    /// Whether it can run here now; the error is one line saying why not (e.g. server unreachable).
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Whether it offers a workload; the error says why not.
    fn supports(&self, w: Workload) -> Result<(), &'static str>;
    /// Runs one side of one workload.
    fn run<'a>(
        &'a self,
        side: Side,
        w: Workload,
        cfg: &'a RunConfig,
    ) -> BoxFuture<'a, BenchResult<Sample>>;
}
