//! `larslab compare` on a fixed set of run directories (tests/fixtures/compare:
//! four small runs, two rates × two seeds), against golden outputs
//! (tests/fixtures/compare-expected, reviewed by hand when they were made).

mod common;
use common::{larslab, repo, succeed};

fn compare(args: &[&str]) -> String {
    let output = succeed(repo(), &[&["compare"], args].concat());
    String::from_utf8(output.stdout).unwrap()
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/compare-expected/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn outputs_match_the_golden_files() {
    let runs = "tests/fixtures/compare";
    assert_eq!(compare(&[runs, "--target", "0.3"]), golden("table.txt"));
    assert_eq!(
        compare(&[
            runs,
            "--target",
            "0.3",
            "--group-seeds",
            "--format",
            "md",
            "--sort",
            "final_val_acc"
        ]),
        golden("grouped.md")
    );
    assert_eq!(
        compare(&[runs, "--target", "0.3", "--group-seeds", "--format", "csv"]),
        golden("grouped.csv")
    );
    assert_eq!(
        compare(&[
            "tests/fixtures/compare/optimizer.lr=0.2,seed=0",
            "tests/fixtures/compare/optimizer.lr=0.05,seed=1",
            "--target",
            "0.3",
            "--format",
            "json"
        ]),
        golden("two.json")
    );
}

#[test]
fn grouped_figures_are_means_over_seeds() {
    let csv = compare(&["tests/fixtures/compare", "--group-seeds", "--format", "csv"]);
    let read = |run: &str| -> f64 {
        let path = format!(
            "{}/tests/fixtures/compare/{run}/summary.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        s["final_val_accuracy"].as_f64().unwrap()
    };
    let mean = (read("optimizer.lr=0.2,seed=0") + read("optimizer.lr=0.2,seed=1")) / 2.0;
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let column = header.iter().position(|c| *c == "final_val_acc").unwrap();
    let row = csv
        .lines()
        .find(|l| l.split(',').nth(1) == Some("0.2"))
        .unwrap();
    let got: f64 = row.split(',').nth(column).unwrap().parse().unwrap();
    assert!((got - mean).abs() < 1e-12, "{got} vs {mean}");
}

#[test]
fn a_path_without_runs_and_an_unknown_sort_key_are_user_errors() {
    for args in [
        vec!["tests"],
        vec!["tests/fixtures/compare", "--sort", "colour"],
    ] {
        let output = larslab(repo(), &[&["compare"], &args[..]].concat());
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&output.stderr).starts_with("error:"));
    }
}

#[test]
fn plots_are_written_as_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("loss.png");
    let svg = dir.path().join("grads.svg");
    for args in [
        vec![
            "tests/fixtures/compare",
            "--metric",
            "loss/train",
            "--log-y",
            "--out",
            png.to_str().unwrap(),
        ],
        vec![
            "tests/fixtures/compare/optimizer.lr=0.2,seed=0",
            "--metric",
            "grad_norm",
            "--layers",
            "weight$",
            "--out",
            svg.to_str().unwrap(),
        ],
    ] {
        succeed(repo(), &[&["plot"], &args[..]].concat());
    }
    let png = std::fs::read(&png).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("fc1.weight") && !svg.contains("fc1.bias"));
}
