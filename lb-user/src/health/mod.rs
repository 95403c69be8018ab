//! Health checks: what a check is ([`spec`]), running one ([`probe`]), the per (service, backend)
//! state with HAProxy's rise/fall and lb's role rules ([`machine`]), and the tasks that run them
//! ([`scheduler`]). Results flow to the map owner as [`scheduler::Update`]s.
pub mod machine;
pub mod probe;
pub mod scheduler;
pub mod spec;
