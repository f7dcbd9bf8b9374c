//! The registry on Redis, shared by every process that uses the same server and namespace.
