pub mod harness;
pub mod sim;
pub mod fixture;
