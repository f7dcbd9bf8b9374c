//! Switchyard `ipc` transport (work in progress).
