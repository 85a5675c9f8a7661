//! lbctl: the agent that turns Marathon VIP labels into XDP load-balancer state, and the
//! commands that inspect it. The binary is a thin shell over `cli`.
pub mod agent;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod maglev;
pub mod marathon;
pub mod metrics;
pub mod model;
mod resize;
pub mod source;
pub mod status;

/// The Marathon HTTP client and event stream, under their former path; they live in `source`.
pub mod marathon_client {
    pub use crate::source::{
        events::{EventStream, RELEVANT_EVENTS},
        marathon::{Auth, Client, ClientConfig, redact},
    };
}

pub use error::{Error, Result};
