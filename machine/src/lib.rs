//! Switchyard statecharts (work in progress).
