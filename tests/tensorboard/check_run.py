#!/usr/bin/env python3
"""Reads finished larslab runs with TensorBoard's own readers and checks them.

Usage: check_run.py RUN_DIR [RUN_DIR ...]

For each run: every metrics.jsonl tag is a TensorBoard scalar with the same
steps and the same values (for a run resumed from an older checkpoint, the
steps its first process logged past that checkpoint are purged by the
SessionLog START the resumed process writes, so no step appears twice) (as f32; non-finite values are absent and the step
carries `diverged` = 1); parameter and gradient histograms parse and count
their tensors' elements; the config text, the hparams experiment, session
start and end, and the custom-scalars layout parse with the plugins' own
parsers. Prints one summary line per run; exits non-zero on any mismatch.
"""

import json
import math
import os
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.util import tensor_util

PER_LAYER = ["grad_norm", "weight_norm", "trust_ratio", "lr_eff", "update_ratio"]


def event_files(run):
    """A resumed run writes one event file per process; each starts with the config and layout."""
    return sum(1 for f in os.listdir(run) if f.startswith("events.out.tfevents."))


def load(run):
    acc = ea.EventAccumulator(run, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def check_scalars(acc, run):
    expected = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            step = record.pop("step")
            for tag, value in record.items():
                if value is not None:
                    expected.setdefault(tag, []).append((step, value))
                else:
                    assert record.get("diverged") == 1, f"step {step}: {tag} is null but no diverged mark"
    tags = set(acc.Tags()["scalars"])
    assert tags == set(expected), f"scalar tags differ: {sorted(tags ^ set(expected))}"
    count = 0
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], f"{tag}: steps differ"
        for (step, value), (_, tb_value) in zip(points, got):
            assert tb_value == float(np.float32(value)), f"{tag} step {step}: {tb_value} != {value}"
            count += 1
    return len(expected), count


def check_histograms(acc, run):
    tags = acc.Tags()["histograms"]
    config = open(os.path.join(run, "config.toml")).read()
    if "tensorboard = true" in config and "histogram_every = 0" not in config:
        assert any(t.startswith("params/") for t in tags) and any(t.startswith("grads/") for t in tags), tags
    for tag in tags:
        for event in acc.Histograms(tag):
            h = event.histogram_value
            assert h.num > 0 and sum(h.bucket) == h.num, (tag, h)
            assert len(h.bucket) == len(h.bucket_limit) <= 30
            assert h.min <= h.max
    return len(tags)


def check_text(acc, run):
    md = acc.SummaryMetadata("config")
    assert md.plugin_data.plugin_name == text_metadata.PLUGIN_NAME
    text_metadata.parse_plugin_metadata(md.plugin_data.content)
    events = acc.Tensors("config")
    assert len(events) == event_files(run), f"{len(events)} config texts"
    event = events[-1]
    text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    for line in open(os.path.join(run, "config.toml")).read().splitlines():
        assert line in text, f"config line {line!r} not in the text summary"


def check_hparams(acc, run):
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])
    declared = {h.name for h in experiment.hparam_infos}
    assert declared == set(start.hparams), sorted(declared ^ set(start.hparams))
    metrics = [(m.name.group, m.name.tag) for m in experiment.metric_infos]
    assert metrics == [("", "loss/train"), ("", "loss/val"), ("", "accuracy/val")], metrics
    summary = json.load(open(os.path.join(run, "summary.json")))
    want = api_pb2.STATUS_FAILURE if summary["diverged"] else api_pb2.STATUS_SUCCESS
    assert end.status == want, (end.status, want)
    assert start.group_name and end.end_time_secs >= start.start_time_secs
    for key in ["optimizer.kind", "optimizer.lr", "data.batch_size", "model.init", "model.activation",
                "model.depth", "model.dropout", "seed"]:
        assert key in start.hparams, f"hparam {key} missing"
    return start


def check_layout(acc, run):
    events = acc.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)
    assert len(events) == event_files(run), f"{len(events)} layouts"
    event = events[-1]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for metric in PER_LAYER:
        assert f"{metric}, all layers" in charts and charts[f"{metric}, all layers"] == [f"^{metric}/"], charts
    return len(charts)


def main(runs):
    for run in runs:
        acc = load(run)
        n_tags, n_values = check_scalars(acc, run)
        n_hist = check_histograms(acc, run)
        check_text(acc, run)
        start = check_hparams(acc, run)
        n_charts = check_layout(acc, run)
        print(f"{run}: {n_tags} scalar tags, {n_values} values equal to metrics.jsonl, "
              f"{n_hist} histogram tags, config text, {len(start.hparams)} hparams "
              f"(group {start.group_name}), {n_charts} custom-scalar charts: OK")


if __name__ == "__main__":
    main(sys.argv[1:])
