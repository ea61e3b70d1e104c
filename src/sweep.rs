//! `larslab sweep`: the cartesian product of a grid, each point a run.
//!
//! Every run is a separate `larslab train` process under one sweep
//! directory, N at a time with the cores divided among them. `sweep.json`
//! records the grid and each run's name, overrides, config and status. A
//! sweep started again skips the runs that finished with the same resolved
//! config and reruns the others. The sweep directory is one TensorBoard
//! experiment: the runs do not declare the HParams experiment themselves;
//! the sweep declares it once, with the grid's keys marked as differing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, first_repeat, parse_value};
use crate::error::UserError;
use crate::fsutil::atomic_write;
use crate::run_dir;
use crate::sinks::tensorboard::{experiment_hparams, experiment_metrics, hparams};
use crate::tensorboard::EventWriter;
use crate::train::{Status, Summary};

/// One point of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedRun {
    pub index: usize,
    pub name: String,
    /// The `KEY=VALUE` overrides that make this point (grid keys, then the seed).
    pub overrides: Vec<String>,
    /// The resolved config, or why the point's values are invalid.
    #[serde(skip)]
    pub config: Result<Config, String>,
    pub status: RunStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A failed run's exit status (2: its input was bad); `None` for a
    /// point refused before it ran, which counts as bad input too.
    #[serde(skip)]
    pub exit_code: Option<i32>,
    /// Interrupted earlier with the same resolved config and a checkpoint:
    /// continued with `train --resume` instead of started afresh.
    #[serde(skip)]
    pub resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Pending,
    Running,
    Finished,
    Diverged,
    Failed,
    Interrupted,
    /// Finished earlier with the same resolved config.
    Skipped,
}

/// A sweep: where it lives, the grid, and its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub name: String,
    #[serde(skip)]
    pub dir: PathBuf,
    pub grid: Vec<(String, Vec<String>)>,
    pub seeds: Vec<u64>,
    pub runs: Vec<PlannedRun>,
    /// The arguments each run's `larslab train` gets before its own overrides.
    #[serde(skip)]
    pub base_args: Vec<String>,
    /// Stopped by SIGINT or SIGTERM before every run had started or ended.
    #[serde(skip)]
    pub interrupted: bool,
}

/// Splits `KEY=V1,V2,...` at top-level commas (an array value keeps its commas).
pub fn parse_grid(spec: &str) -> Result<(String, Vec<String>), UserError> {
    let bad = || UserError::Usage(format!("--grid `{spec}`: expected KEY=V1,V2,..."));
    let (key, values) = spec.split_once('=').ok_or_else(bad)?;
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut current) = (0i32, false, String::new());
    for c in values.chars() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(std::mem::take(&mut current).trim().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current.trim().to_string());
    if key.trim().is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    Ok((key.trim().to_string(), parts))
}

/// How a value appears in a run's name: as written, without spaces or path separators.
fn name_part(value: &str) -> String {
    let text = match parse_value(value) {
        toml::Value::String(s) => s,
        other => other.to_string(),
    };
    text.chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| if matches!(c, '/' | '\\') { '_' } else { c })
        .collect()
}

impl Sweep {
    /// Expands the grid: the `[sweep]` table of the config, then `--grid`
    /// and `--seeds` from the command line (which replace a file's entry for
    /// the same key). Invalid points are kept, marked failed, so that one bad
    /// value does not stop the rest.
    pub fn plan(
        config_path: Option<&Path>,
        overrides: &[String],
        grid_args: &[String],
        seeds_arg: Option<&[u64]>,
        out: &Path,
        name: Option<&str>,
    ) -> Result<Sweep, UserError> {
        let base = Config::load(config_path, overrides)?;
        let mut grid: Vec<(String, Vec<String>)> = Vec::new();
        for (key, values) in &base.sweep.grid {
            let toml::Value::Array(values) = values else {
                return Err(UserError::key(
                    format!("sweep.grid.{key}"),
                    "must be a list of values",
                ));
            };
            grid.push((key.clone(), values.iter().map(|v| v.to_string()).collect()));
        }
        let file_keys: Vec<String> = grid.iter().map(|(k, _)| k.clone()).collect();
        let mut given: Vec<String> = Vec::new();
        for spec in grid_args {
            let (key, values) = parse_grid(spec)?;
            if given.contains(&key) {
                return Err(UserError::Usage(format!(
                    "--grid {key}=... is given twice; list every value in one --grid {key}=V1,V2,..."
                )));
            }
            if key == "seed" {
                return Err(UserError::Usage(
                    "--grid seed=...: seeds are a sweep's own axis; give them with --seeds S1,S2,..."
                        .into(),
                ));
            }
            let parsed: Vec<toml::Value> = values.iter().map(|v| parse_value(v)).collect();
            if let Some(twice) = first_repeat(&parsed) {
                return Err(UserError::Usage(format!(
                    "--grid {spec}: the value {twice} is listed twice (it would run twice)"
                )));
            }
            given.push(key.clone());
            grid.retain(|(k, _)| *k != key);
            grid.push((key, values));
        }
        // A key both fixed by --set and varied by the grid: neither may win silently.
        for o in overrides {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k).trim();
            let varied = grid.iter().find(|(k, _)| {
                k == key || k.starts_with(&format!("{key}.")) || key.starts_with(&format!("{k}."))
            });
            if let Some((axis, _)) = varied {
                let place = if given.contains(axis) {
                    format!("--grid {axis}=...")
                } else {
                    let file = config_path
                        .map_or("the built-in config".into(), |p| p.display().to_string());
                    debug_assert!(file_keys.contains(axis));
                    format!("the [sweep] grid of {file}")
                };
                return Err(UserError::Usage(format!(
                    "--set {o} fixes `{key}`, which {place} varies; drop one (to run only some values, give them with --grid {axis}=V1,...)"
                )));
            }
        }
        let seeds: Vec<u64> = match seeds_arg {
            Some(seeds) => seeds.to_vec(),
            None if !base.sweep.seeds.is_empty() => base.sweep.seeds.clone(),
            None => vec![base.seed],
        };
        if let Some(twice) = first_repeat(&seeds) {
            return Err(UserError::Usage(format!(
                "--seeds: seed {twice} is listed twice (it would run twice)"
            )));
        }
        let name = name.map_or_else(|| format!("{}-sweep", base.name), str::to_string);
        if name.trim().is_empty() || name.contains(['/', '\\', '\n']) || name == "." || name == ".."
        {
            return Err(UserError::Usage(format!(
                "--name {name:?}: a sweep's name is a plain directory name"
            )));
        }
        // Absolute, so that a job script can say where its output goes.
        let out = std::env::current_dir().map_or_else(|_| out.to_path_buf(), |cwd| cwd.join(out));
        let dir = out.join(&name);

        let mut points: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (key, values) in &grid {
            points = points
                .into_iter()
                .flat_map(|point| {
                    values.iter().map(move |v| {
                        let mut p = point.clone();
                        p.push((key.clone(), v.clone()));
                        p
                    })
                })
                .collect();
        }
        let mut base_args = Vec::new();
        if let Some(path) = config_path {
            base_args.extend(["--config".to_string(), path.display().to_string()]);
        }
        for o in overrides {
            base_args.extend(["--set".to_string(), o.clone()]);
        }
        let mut runs = Vec::new();
        for point in &points {
            for &seed in &seeds {
                let mut assignments: Vec<String> =
                    point.iter().map(|(k, v)| format!("{k}={v}")).collect();
                assignments.push(format!("seed={seed}"));
                let mut parts: Vec<String> = point
                    .iter()
                    .map(|(k, v)| format!("{k}={}", name_part(v)))
                    .collect();
                if seeds.len() > 1 || grid.is_empty() {
                    parts.push(format!("seed={seed}"));
                }
                let run_name = parts.join(",");
                let config = Self::run_config(config_path, overrides, &assignments, &run_name);
                let error = config.as_ref().err().cloned();
                runs.push(PlannedRun {
                    index: runs.len(),
                    name: run_name,
                    overrides: assignments,
                    status: if error.is_some() {
                        RunStatus::Failed
                    } else {
                        RunStatus::Pending
                    },
                    error,
                    config,
                    exit_code: None,
                    resume: false,
                });
            }
        }
        for (i, run) in runs.iter().enumerate() {
            if let Some(other) = runs[..i].iter().find(|r| r.name == run.name) {
                return Err(UserError::Usage(format!(
                    "grid points {} and {} would both be named `{}` (values that differ only in spaces, quotes or slashes); make them distinct",
                    other.index, run.index, run.name
                )));
            }
        }
        // A grid whose every point is invalid (a misspelt key, say) is a usage error, not N failed runs.
        let errors: Option<Vec<&String>> = runs.iter().map(|r| r.error.as_ref()).collect();
        if let Some(first) = errors.and_then(|e| e.first().copied()) {
            return Err(UserError::Usage(format!(
                "every run of the grid is invalid: {first}"
            )));
        }
        let sweep = Sweep {
            name,
            dir,
            grid,
            seeds,
            runs,
            base_args,
            interrupted: false,
        };
        sweep.check_same_grid()?;
        Ok(sweep)
    }

    /// A sweep directory that holds runs this grid does not have (another
    /// grid's, other seeds') is refused: started here, this sweep would
    /// overwrite their `sweep.json` and mix its runs with theirs. A restart
    /// with the same grid, or one that adds values or fixes a bad one, keeps
    /// every run that exists.
    fn check_same_grid(&self) -> Result<(), UserError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        let mut foreign: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(run_dir::CONFIG).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !self.runs.iter().any(|r| &r.name == name))
            .collect();
        foreign.sort();
        match foreign.first() {
            None => Ok(()),
            Some(first) => Err(UserError::data(
                &self.dir,
                format!(
                    "holds {} run(s) of another grid or other seeds (`{first}`{}); give this sweep another --name (or remove them)",
                    foreign.len(),
                    if foreign.len() > 1 { ", ..." } else { "" }
                ),
            )),
        }
    }

    /// The resolved config a run will write, exactly as its `train` process resolves it.
    fn run_config(
        config_path: Option<&Path>,
        overrides: &[String],
        assignments: &[String],
        name: &str,
    ) -> Result<Config, String> {
        let mut all: Vec<String> = overrides.to_vec();
        all.extend(assignments.iter().cloned());
        all.push("log.hparams_experiment=false".into());
        let mut config = Config::load(config_path, &all).map_err(|e| e.to_string())?;
        config.name = name.to_string();
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    fn create_dir(&self) -> Result<(), UserError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| UserError::data(&self.dir, format!("cannot create: {e}")))
    }

    /// Keys whose values differ between the runs: the grid's, and `seed` with several seeds.
    pub fn varying_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.grid.iter().map(|(k, _)| k.clone()).collect();
        if self.seeds.len() > 1 {
            keys.push("seed".into());
        }
        keys
    }

    pub fn write_json(&self) -> anyhow::Result<()> {
        self.create_dir()?;
        #[derive(Serialize)]
        struct RunEntry<'a> {
            #[serde(flatten)]
            run: &'a PlannedRun,
            config: Option<toml::Table>,
        }
        let entries: Vec<RunEntry> = self
            .runs
            .iter()
            .map(|run| RunEntry {
                run,
                config: run
                    .config
                    .as_ref()
                    .ok()
                    .and_then(|c| toml::Table::try_from(c).ok()),
            })
            .collect();
        let json = serde_json::json!({
            "name": self.name,
            "grid": self.grid.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "seeds": self.seeds,
            "runs": entries,
        });
        atomic_write(
            &self.dir.join("sweep.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Declares the HParams experiment once, in the sweep directory itself.
    pub fn declare_experiment(&self) -> anyhow::Result<()> {
        let Some(config) = self.runs.iter().find_map(|r| r.config.as_ref().ok()) else {
            return Ok(());
        };
        let keys = self.varying_keys();
        let differing: Vec<&str> = keys.iter().map(String::as_str).collect();
        let already = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            });
        if already {
            return Ok(());
        }
        let mut writer = EventWriter::create(&self.dir)?;
        writer.hparams_experiment(
            &experiment_hparams(&hparams(config), &differing),
            &experiment_metrics(),
        )?;
        writer.flush()?;
        Ok(())
    }

    /// Marks the runs that already finished with the same resolved config as
    /// skipped, and clears the directories of the others so they start afresh.
    fn reconcile(&mut self) -> anyhow::Result<()> {
        for run in self
            .runs
            .iter_mut()
            .filter(|r| r.status == RunStatus::Pending)
        {
            let dir = self.dir.join(&run.name);
            if !dir.exists() {
                continue;
            }
            let expected = run.config.as_ref().map(Config::to_toml).ok();
            let written = std::fs::read_to_string(dir.join(run_dir::CONFIG)).ok();
            let summary: Option<Summary> = std::fs::read_to_string(dir.join(run_dir::SUMMARY))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            let same = expected.is_some() && expected == written;
            let done = summary
                .as_ref()
                .is_some_and(|s| s.status != Status::Interrupted);
            let checkpointed =
                !crate::checkpoint::steps(&dir.join(run_dir::CHECKPOINTS)).is_empty();
            if same && done {
                run.status = RunStatus::Skipped;
            } else if same && checkpointed {
                // Interrupted (SIGINT: summary says so) or killed (no summary).
                run.resume = true;
            } else {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        Ok(())
    }

    fn command(&self, run: &PlannedRun, threads: usize) -> Command {
        let mut cmd = Command::new(own_executable());
        cmd.arg("train").arg("--quiet");
        if run.resume {
            cmd.arg("--resume").arg(self.dir.join(&run.name));
        } else {
            cmd.args(&self.base_args);
            for o in &run.overrides {
                cmd.arg("--set").arg(o);
            }
            cmd.args(["--set", "log.hparams_experiment=false", "--out"])
                .arg(&self.dir)
                .arg("--name")
                .arg(&run.name);
        }
        cmd.env("RAYON_NUM_THREADS", threads.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs the pending runs (all, or only `only`), `jobs` at a time.
    pub fn execute(&mut self, jobs: usize, only: Option<usize>, quiet: bool) -> anyhow::Result<()> {
        if let Some(index) = only
            && index >= self.runs.len()
        {
            return Err(UserError::Usage(format!(
                "--only {index}: the sweep has {} runs",
                self.runs.len()
            ))
            .into());
        }
        self.create_dir()?;
        if let Some(index) = only {
            if index >= self.runs.len() {
                return Err(UserError::Usage(format!(
                    "--only {index}: the sweep has {} runs",
                    self.runs.len()
                ))
                .into());
            }
            // Another array task's run, invalid or not, is not this task's to report.
            for run in &mut self.runs {
                if run.index != index {
                    run.status = RunStatus::Skipped;
                }
            }
        }
        self.reconcile()?;
        self.declare_experiment()?;
        if only.is_none() {
            self.write_json()?;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let jobs = jobs.max(1);
        let threads = (cores / jobs).max(1);
        let pending: Vec<usize> = self
            .runs
            .iter()
            .filter(|r| r.status == RunStatus::Pending)
            .map(|r| r.index)
            .collect();
        let bar = progress_bar(pending.len(), quiet);
        let mut queue = pending.into_iter();
        let mut running: Vec<(usize, Child)> = Vec::new();
        // SIGINT/SIGTERM: no new runs; the running ones (Ctrl-C reaches
        // their process group too) stop at their next step with a
        // checkpoint, and a restart resumes them.
        let interrupt = crate::interrupt::install()?;
        loop {
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                self.interrupted = true;
                queue = Vec::new().into_iter();
            }
            while running.len() < jobs {
                let Some(index) = queue.next() else { break };
                let child = self.command(&self.runs[index], threads).spawn()?;
                self.runs[index].status = RunStatus::Running;
                running.push((index, child));
            }
            if running.is_empty() {
                break;
            }
            let mut finished = Vec::new();
            for (slot, (index, child)) in running.iter_mut().enumerate() {
                if let Some(exit) = child.try_wait()? {
                    let stderr = child.stderr.take().map(read_all).unwrap_or_default();
                    finished.push((slot, *index, exit, stderr));
                }
            }
            for (slot, index, exit, stderr) in finished.into_iter().rev() {
                running.remove(slot);
                self.runs[index].exit_code = exit.code();
                self.settle(index, exit.success(), &stderr);
                bar.inc(1);
            }
            bar.set_message(self.counts());
            if only.is_none() {
                self.write_json()?;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bar.finish_with_message(self.counts());
        Ok(())
    }

    /// Records how run `index` ended, from its exit and its summary.
    fn settle(&mut self, index: usize, success: bool, stderr: &str) {
        let dir = self.dir.join(&self.runs[index].name);
        let summary: Option<Summary> = std::fs::read_to_string(dir.join(run_dir::SUMMARY))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let run = &mut self.runs[index];
        run.status = match (&summary, success) {
            (Some(s), _) if s.status == Status::Interrupted => RunStatus::Interrupted,
            (Some(s), true) if s.status == Status::Diverged => RunStatus::Diverged,
            (Some(_), true) => RunStatus::Finished,
            _ => RunStatus::Failed,
        };
        if run.status == RunStatus::Failed {
            run.error = Some(
                stderr
                    .lines()
                    .last()
                    .map(|line| line.strip_prefix("error: ").unwrap_or(line))
                    .unwrap_or("the run failed")
                    .to_string(),
            );
        }
    }

    fn counts(&self) -> String {
        let count = |s| self.runs.iter().filter(|r| r.status == s).count();
        format!(
            "done {}, running {}, failed {}, diverged {}, skipped {}",
            count(RunStatus::Finished) + count(RunStatus::Diverged),
            count(RunStatus::Running),
            count(RunStatus::Failed),
            count(RunStatus::Diverged),
            count(RunStatus::Skipped),
        )
    }

    /// Every run failed, and each for bad input (exit 2, or refused before
    /// it ran): the sweep's input is bad, not its runs' luck.
    pub fn all_failed_on_bad_input(&self) -> bool {
        !self.runs.is_empty()
            && self
                .runs
                .iter()
                .all(|r| r.status == RunStatus::Failed && r.exit_code.is_none_or(|c| c == 2))
    }

    /// The runs that failed, for the final report.
    pub fn failures(&self) -> Vec<&PlannedRun> {
        self.runs
            .iter()
            .filter(|r| r.status == RunStatus::Failed)
            .collect()
    }
}

/// The binary the sweep runs its runs with: on Linux the very file this
/// process was started from (`/proc/self/exe` resolves to its inode even
/// after a rebuild replaced or deleted the path), elsewhere `current_exe()`.
fn own_executable() -> PathBuf {
    let proc_self = Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc_self.exists() {
        return proc_self.to_path_buf();
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("larslab"))
}

fn read_all(mut r: impl std::io::Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

fn progress_bar(len: usize, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs  {msg}  (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// An sbatch script running the sweep as a Slurm job array: task i runs
/// `larslab sweep <the same arguments> --only i` against the shared sweep directory.
pub fn slurm_script(sweep: &Sweep, sweep_args: &[String], options: &SlurmOptions) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("larslab"));
    let cwd = std::env::current_dir().unwrap_or_default();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut script = String::from("#!/bin/bash\n");
    script += &format!(
        "#SBATCH --job-name={}\n",
        sweep.name.replace(char::is_whitespace, "_")
    );
    script += &format!("#SBATCH --array=0-{}\n", sweep.runs.len().saturating_sub(1));
    script += &format!("#SBATCH --cpus-per-task={}\n", options.cpus);
    script += &format!("#SBATCH --time={}\n", options.time);
    if let Some(p) = &options.partition {
        script += &format!("#SBATCH --partition={p}\n");
    }
    script += &format!("#SBATCH --output={}/slurm-%A_%a.out\n", sweep.dir.display());
    for line in &options.extra {
        script += &format!("#SBATCH {line}\n");
    }
    script += "set -euo pipefail\n";
    script += &format!("cd {}\n", quote(&cwd.display().to_string()));
    let args: Vec<String> = sweep_args.iter().map(|a| quote(a)).collect();
    script += &format!(
        "exec {} sweep {} --jobs 1 --quiet --only \"$SLURM_ARRAY_TASK_ID\"\n",
        quote(&exe.display().to_string()),
        args.join(" ")
    );
    script
}

#[derive(Debug, Clone)]
pub struct SlurmOptions {
    pub time: String,
    pub cpus: usize,
    pub partition: Option<String>,
    pub extra: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_values_split_at_top_level_commas() {
        assert_eq!(
            parse_grid("model.hidden=[128,128],[256]").unwrap(),
            (
                "model.hidden".to_string(),
                vec!["[128,128]".to_string(), "[256]".to_string()]
            )
        );
        assert_eq!(
            parse_grid("optimizer.kind=sgd,\"lars\"").unwrap().1,
            vec!["sgd".to_string(), "\"lars\"".to_string()]
        );
        assert!(parse_grid("optimizer.lr").is_err());
        assert!(parse_grid("optimizer.lr=0.1,").is_err());
    }

    #[test]
    fn the_product_is_expanded_with_readable_names() {
        let grid = vec![
            "optimizer.kind=sgd,lars".to_string(),
            "optimizer.lr=0.1,2".to_string(),
        ];
        let sweep = Sweep::plan(
            None,
            &[],
            &grid,
            Some(&[0, 1]),
            Path::new("/tmp/x"),
            Some("s"),
        )
        .unwrap();
        let names: Vec<&str> = sweep.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names.len(), 8);
        assert_eq!(names[0], "optimizer.kind=sgd,optimizer.lr=0.1,seed=0");
        assert_eq!(names[7], "optimizer.kind=lars,optimizer.lr=2,seed=1");
        let run = &sweep.runs[7];
        let config = run.config.as_ref().unwrap();
        assert_eq!(config.seed, 1);
        assert_eq!(config.optimizer.lr, 2.0);
        assert_eq!(
            sweep.varying_keys(),
            ["optimizer.kind", "optimizer.lr", "seed"]
        );
    }

    #[test]
    fn a_bad_grid_value_fails_only_its_runs() {
        let grid = vec!["optimizer.lr=0.1,-1".to_string()];
        let sweep = Sweep::plan(None, &[], &grid, None, Path::new("/tmp/x"), Some("s")).unwrap();
        assert_eq!(sweep.runs[0].status, RunStatus::Pending);
        assert_eq!(sweep.runs[1].status, RunStatus::Failed);
        assert!(
            sweep.runs[1]
                .error
                .as_ref()
                .unwrap()
                .contains("optimizer.lr")
        );
    }
}
