pub mod bench;
pub mod fixture;
pub mod harness;
pub mod sim;
pub mod traffic;
