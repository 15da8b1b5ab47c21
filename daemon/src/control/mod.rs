//! Control plane: signals, metrics and the admin (metrics/status) server. Never on the data path.
pub mod access;
pub mod admin;
pub mod events;
pub mod listen;
pub mod metrics;
pub mod signals;
