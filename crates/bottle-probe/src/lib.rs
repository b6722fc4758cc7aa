//! The escape catalogue as a library: what `bottle-probe` attempts, with which arguments, and what must happen. The
//! escape suite (`bot-bottle`'s tests) and `bot-bottle selftest` both draw their cases from it; the probe binary
//! (`main.rs`) makes the attempts.

pub mod catalogue;
