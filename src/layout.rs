//! The names of the files in a run folder, a study folder and beside a
//! checkpoint: the one place they are spelled. The run layer
//! ([`crate::run`]) owns their contents; the checkpoint store and the file
//! guards below it, and the report and the CLI above it, name them through
//! these constants.

/// A run's configuration (TOML, [`crate::run::TrainConfig`]).
pub const CONFIG: &str = "config.toml";
/// A run's metrics, one JSON object a line ([`crate::run::MetricsLine`]).
pub const METRICS: &str = "metrics.jsonl";
/// A run's checkpoint (safetensors with the spec in its header).
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// `prelu attack`'s result beside a run.
pub const ATTACK: &str = "attack.json";
/// `prelu stability`'s result beside a run.
pub const STABILITY: &str = "stability.json";
/// A study's result.
pub const STUDY: &str = "study.json";
/// The HTML page of a study, or a run's report by default.
pub const REPORT: &str = "report.html";
/// What a study leaves in a run folder whose loss diverged.
pub const DIVERGED: &str = "study-diverged.txt";

/// Every file a run or study folder holds that no other output may replace.
pub const RUN_FILES: [&str; 5] = [CONFIG, METRICS, CHECKPOINT, STUDY, DIVERGED];
