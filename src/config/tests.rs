//! The config's tests: loading, overrides, every section's checks, keys that
//! do not apply, written configs loading again.

use std::path::Path;

use super::load::{from_table, parse_table};
use super::*;

#[test]
fn built_in_experiment_is_valid() {
    let config = Config::load(None, &[]).unwrap();
    assert_eq!(config.name, "default");
}

#[test]
fn empty_file_is_all_defaults() {
    let config = from_table(toml::Table::new()).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn written_config_reads_back_identically() {
    let config = Config::load(None, &["model.hidden=[3,4]".into()]).unwrap();
    let again = from_table(config.to_toml().parse().unwrap()).unwrap();
    assert_eq!(config, again);
}

#[test]
fn values_parse_as_toml_or_bare_strings() {
    assert_eq!(parse_value("0.5"), toml::Value::Float(0.5));
    assert_eq!(parse_value("3"), toml::Value::Integer(3));
    assert_eq!(parse_value("true"), toml::Value::Boolean(true));
    assert_eq!(parse_value("tanh"), toml::Value::String("tanh".into()));
    assert_eq!(parse_value("\"tanh\""), toml::Value::String("tanh".into()));
    assert_eq!(
        parse_value("[256, 256]"),
        toml::Value::Array(vec![256.into(), 256.into()])
    );
}

#[test]
fn overrides_reach_nested_keys() {
    let config = Config::load(
        None,
        &[
            "optimizer.lr=0.5".into(),
            "model.hidden=[]".into(),
            "model.activation=tanh".into(),
            "seed=7".into(),
        ],
    )
    .unwrap();
    assert_eq!(config.optimizer.lr, 0.5);
    assert!(config.model.hidden.is_empty());
    assert_eq!(config.model.activation, Activation::Tanh);
    assert_eq!(config.seed, 7);
}

fn rejected_key(assignment: &str) -> String {
    match Config::load(None, &[assignment.to_string()]) {
        Err(UserError::ConfigKey { key, .. }) => key,
        other => panic!("{assignment}: expected a config key error, got {other:?}"),
    }
}

#[test]
fn bad_values_name_their_key() {
    for (assignment, key) in [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("optimizer.momentum=1", "optimizer.momentum"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
        ("optimizer.kind=rmsprop", "optimizer.kind"),
        (
            "optimizer.trust_coefficient=0",
            "optimizer.trust_coefficient",
        ),
        ("optimizer.eps=-1e-9", "optimizer.eps"),
        ("optimizer.denominator=optax", "optimizer.denominator"),
        ("optimizer.clip=true", "optimizer.clip"),
        ("optimizer.beta2=1", "optimizer.beta2"),
        ("optimizer.adam_eps=0", "optimizer.adam_eps"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=-3", "data.batch_size"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("data.kind=idx", "data.images"),
        ("model.dropout=1", "model.dropout"),
        ("model.dropout=-0.1", "model.dropout"),
        ("model.activation=swish", "model.activation"),
        ("model.init=glorot", "model.init"),
        ("model.hidden=[0]", "model.hidden"),
        ("model.hidden=[100000000]", "model.hidden"),
        ("model.hidden=[100000,100000]", "model.hidden"),
        ("data.n_train=1000000000000", "data.n_train"),
        (
            "data.teacher_hidden=[9223372036854775807]",
            "data.teacher_hidden",
        ),
        ("model.init_scale=1e39", "model.init_scale"),
        ("model.hidden=3", "model.hidden"),
        ("model.hiden=[3]", "model.hiden"),
        ("colour=1", "colour"),
        ("train.steps=0", "train.steps"),
        ("schedule.kind=linear", "schedule.kind"),
        ("name=a/b", "name"),
    ] {
        assert_eq!(rejected_key(assignment), key, "{assignment}");
    }
}

/// Every float key refuses NaN and both infinities, from `--set` (and so from a file).
#[test]
fn every_float_key_refuses_nan_and_infinity() {
    let floats: Vec<String> = Config::default()
        .flatten()
        .into_iter()
        .filter(|(_, v)| matches!(v, toml::Value::Float(_)))
        .map(|(k, _)| k)
        .collect();
    assert!(floats.len() >= 19, "{floats:?}");
    for key in &floats {
        for value in ["nan", "inf", "-inf", "1e300"] {
            if value == "1e300" && key.starts_with("divergence.") {
                continue; // large finite factors are legal there
            }
            let assignment = format!("{key}={value}");
            match Config::load(None, std::slice::from_ref(&assignment)) {
                Err(UserError::ConfigKey { key: k, .. }) => assert_eq!(&k, key, "{assignment}"),
                Err(other) if value == "1e300" => panic!("{assignment}: {other}"),
                Ok(_) if value == "1e300" => {}
                other => panic!("{assignment}: expected a config key error, got {other:?}"),
            }
        }
    }
    // Finite in f64, infinite in the model's f32.
    assert_eq!(rejected_key("model.bias_init=1e300"), "model.bias_init");
}

fn rejected_message(file: &str, assignments: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, file).unwrap();
    let overrides: Vec<String> = assignments.iter().map(|a| a.to_string()).collect();
    match Config::load(Some(&path), &overrides) {
        Err(UserError::ConfigKey { key, message }) => (key, message),
        other => panic!("{file} {assignments:?}: expected a config key error, got {other:?}"),
    }
}

#[test]
fn keys_that_do_not_apply_to_the_kind_are_errors_naming_key_and_kind() {
    for (file, set, key, kind) in [
        (
            "[optimizer]\nkind = 'adamw'\nmomentum = 0.5\n",
            "",
            "optimizer.momentum",
            "adamw",
        ),
        (
            "",
            "optimizer.kind=adamw,optimizer.nesterov=true",
            "optimizer.nesterov",
            "adamw",
        ),
        (
            "[optimizer]\nkind = 'lamb'\n",
            "optimizer.trust_coefficient=0.01",
            "optimizer.trust_coefficient",
            "lamb",
        ),
        (
            "[optimizer]\nkind = 'lamb'\neps = 1e-6\n",
            "",
            "optimizer.eps",
            "lamb",
        ),
        (
            "[optimizer]\nkind = 'sgd'\nexclude_1d = false\n",
            "",
            "optimizer.exclude_1d",
            "sgd",
        ),
        (
            "[optimizer]\nkind = 'lars'\nbeta1 = 0.8\n",
            "",
            "optimizer.beta1",
            "lars",
        ),
        ("", "optimizer.adam_eps=1e-6", "optimizer.adam_eps", "sgd"),
        ("[model]\nconv = [[8, 5]]\n", "", "model.conv", "mlp"),
        (
            "[model]\nbatch_norm = false\n",
            "",
            "model.batch_norm",
            "mlp",
        ),
        ("", "model.pool=avg", "model.pool", "mlp"),
        ("[model]\npadding = 'valid'\n", "", "model.padding", "mlp"),
        // The file sets momentum for its own sgd; `--set` switching to adamw
        // leaves it quiet, but `--set` giving it again with adamw does not.
        (
            "[optimizer]\nmomentum = 0.5\n",
            "optimizer.kind=adamw,optimizer.momentum=0.5",
            "optimizer.momentum",
            "adamw",
        ),
    ] {
        let set: Vec<&str> = set.split(',').filter(|a| !a.is_empty()).collect();
        let (got, message) = rejected_message(file, &set);
        assert_eq!(got, key, "{file} {set:?}");
        assert!(message.contains(&format!("kind = \"{kind}\"")), "{message}");
    }
    assert_eq!(
        rejected_key(
            "divergence.rescue={\"optimizer.kind\" = \"adamw\", \"optimizer.momentum\" = 0.1}"
        ),
        "divergence.rescue: optimizer.momentum"
    );
}

#[test]
fn keys_for_a_kind_the_config_can_reach_are_accepted() {
    let load = |file: &str, set: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let set: Vec<String> = set.iter().map(|a| a.to_string()).collect();
        Config::load(Some(&path), &set).unwrap_or_else(|e| panic!("{file} {set:?}: {e}"))
    };
    // The file's kind, switched by --set: the file's LARS keys stay quiet.
    load(
        "[optimizer]\nkind = 'lars'\ntrust_coefficient = 0.01\n",
        &["optimizer.kind=sgd"],
    );
    load(
        "[model]\nkind = 'cnn'\nconv = [[4, 3]]\npool = 'avg'\n",
        &["model.kind=mlp"],
    );
    // A rescue that switches to lars, and a grid over kinds.
    load(
        "[optimizer]\ntrust_coefficient = 0.01\n[divergence.rescue]\n\"optimizer.kind\" = 'lars'\n",
        &[],
    );
    load(
        "[optimizer]\nclip = false\n[sweep]\ngrid = { \"optimizer.kind\" = ['sgd', 'lars'] }\n",
        &[],
    );
    let config = load("[optimizer]\nkind = 'adamw'\n", &[]);
    let written = config.to_toml();
    assert!(!written.contains("momentum") && !written.contains("trust_coefficient"));
    assert!(
        written.contains("beta1") && !written.contains("\npool"),
        "{written}"
    );
}

/// A run's config.toml written before keys that do not apply were left
/// out (every key) still serves resume, rescue and compare.
#[test]
fn an_older_run_config_with_every_key_loads_as_a_run_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml::to_string_pretty(&Config::default()).unwrap()).unwrap();
    assert!(matches!(
        Config::load(Some(&path), &[]),
        Err(UserError::ConfigKey { .. })
    ));
    let config = Config::load_run(&path, &[]).unwrap();
    assert_eq!(config, Config::default());
    // Its --set overrides are checked as ever.
    assert!(Config::load_run(&path, &["optimizer.beta1=0.5".into()]).is_err());
}

/// Every experiment loads, and the config.toml its run writes loads again to the same text.
#[test]
fn every_experiment_and_its_written_config_load() {
    let dir = tempfile::tempdir().unwrap();
    let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut seen = 0;
    for entry in std::fs::read_dir(experiments).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let config =
            Config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let written = dir.path().join("config.toml");
        std::fs::write(&written, config.to_toml()).unwrap();
        let again = Config::load(Some(&written), &[])
            .unwrap_or_else(|e| panic!("{}'s written config: {e}", path.display()));
        assert_eq!(again.to_toml(), config.to_toml(), "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 8);
}

#[test]
fn config_files_that_are_not_configs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let message = |path: &Path| match Config::load(Some(path), &[]) {
        Err(e @ UserError::ConfigFile { .. }) => e.to_string(),
        other => panic!(
            "{}: expected a config file error, got {other:?}",
            path.display()
        ),
    };
    assert!(message(Path::new("/dev/zero")).contains("larger than 1 MiB"));
    let utf16 = dir.path().join("utf16.toml");
    std::fs::write(&utf16, [0xFF, 0xFE, b's', 0, b'=', 0, b'1', 0]).unwrap();
    assert!(message(&utf16).contains("UTF-16"));
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"seed = 1\nname = \"caf\xe9\"\n").unwrap();
    assert!(message(&latin1).contains("line 2: byte 0xE9 is not UTF-8"));
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "seed = 99999999999999999999\n").unwrap();
    assert!(message(&big).contains("integer 99999999999999999999 is out of range"));
    match Config::load(None, &["seed=99999999999999999999".into()]) {
        Err(UserError::ConfigKey { key, message }) => {
            assert_eq!(key, "seed");
            assert!(message.contains("out of range"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A word stays a string.
    assert_eq!(rejected_key("train.steps=many"), "train.steps");
}

#[test]
fn train_validates_the_sweep_table() {
    for (grid, needle) in [
        ("grid = { \"optimizer.lr\" = 0.1 }", "must be a list"),
        ("grid = { \"optimizer.lr\" = [] }", "at least one value"),
        (
            "grid = { \"optimizer.lr\" = [0.1, 0.1] }",
            "lists the value 0.1 twice",
        ),
        (
            "grid = { \"optimizer.lrr\" = [0.1] }",
            "`optimizer.lrr` is not a config key",
        ),
        ("grid = { seed = [1, 2] }", "sweep.seeds"),
        ("seeds = [1, 1]", "seed 1 twice"),
    ] {
        let (key, message) = rejected_message(&format!("[sweep]\n{grid}\n"), &[]);
        assert!(key.starts_with("sweep."), "{grid}: {key}");
        assert!(message.contains(needle), "{grid}: {message}");
    }
    // A bad value (not a bad key) is left to its own run.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[sweep]\ngrid = { \"optimizer.lr\" = [0.1, -1] }\n").unwrap();
    Config::load(Some(&path), &[]).unwrap();
}

#[test]
fn rescue_overrides_apply_and_are_validated() {
    let config = Config::load(
        None,
        &["divergence.rescue={\"optimizer.kind\" = \"lars\", optimizer = { clip = true }}".into()],
    )
    .unwrap();
    let rescued = config.rescued().unwrap();
    assert_eq!(rescued.optimizer.kind, OptimizerKind::Lars);
    assert!(rescued.optimizer.clip);
    assert_eq!(
        rejected_key("divergence.rescue={\"optimizer.lr\" = -1}"),
        "divergence.rescue: optimizer.lr"
    );
    assert_eq!(
        rejected_key("divergence.rescue={\"optimizer.colour\" = 1}"),
        "divergence.rescue: optimizer.colour"
    );
}

#[test]
fn override_into_a_value_is_rejected() {
    assert_eq!(rejected_key("seed.x=1"), "seed");
}

#[test]
fn malformed_assignment_is_a_usage_error() {
    assert!(matches!(
        Config::load(None, &["optimizer.lr".into()]),
        Err(UserError::Usage(_))
    ));
    assert!(matches!(
        Config::load(None, &["optimizer..lr=1".into()]),
        Err(UserError::Usage(_))
    ));
}

#[test]
fn syntax_errors_name_the_line() {
    let err = parse_table("seed = 1\n[model\n", &Source::BuiltIn).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}
