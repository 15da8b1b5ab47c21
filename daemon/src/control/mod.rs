//! Control plane: signals and (later) metrics and admin. Never on the data path.
pub mod signals;
