//! Training: the step loop, AdamW state and schedule, checkpoints, metrics and the events that
//! headless output (and later the dashboard) consume.

pub mod checkpoint;
pub mod engine;
pub mod evaluation;
pub mod events;
pub mod fsdp;
pub mod guard;
pub mod nodes;
pub mod optim_state;
pub mod optimizer;
pub mod run;
pub mod schedule;
pub mod signals;
pub mod socket;
pub mod step_loop;
pub mod trainer;
