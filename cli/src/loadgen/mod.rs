//! The load generator: synthetic traffic ([`synth`]), open-loop replay of a traffic file
//! against a gateway ([`replay`]), when its requests are sent ([`schedule`]) and what it reports
//! ([`report`]). Traffic files are the gateway's capture format (`gateway::traffic`), so a live
//! capture replays exactly as it arrived.

pub mod replay;
pub mod report;
pub mod schedule;
pub mod synth;
