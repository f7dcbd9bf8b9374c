//! Workloads shared by the ipc benchmark and `switchyard bench` (filled in below).
