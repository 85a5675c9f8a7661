//! lbctl: the agent that turns Marathon VIP labels into XDP load-balancer state, and the
//! commands that inspect it. The binary is a thin shell over `cli`.
pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod error;
pub mod guard;
pub mod lock;
pub mod maglev;
pub mod marathon;
pub mod metrics;
pub mod metrics_server;
pub mod model;
pub mod runtime;
pub mod secrets;
pub mod source;
pub mod status;

pub use error::{Error, Result};
