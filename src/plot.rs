//! PNG figures (plotters, bitmap backend). The font is bundled (DejaVu Sans,
//! assets/fonts) so that drawing text needs nothing from the system.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::probe::ProbeReport;

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font always parses; were it not to, text would be missing, not a crash.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// A named line of (layer, value) points in one colour.
type Series = (&'static str, Vec<(usize, f64)>, RGBColor);

fn to_io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The probe's figure: per-layer spreads of the forward signal and of the
/// back-propagated gradient (log scale), and the histogram of the Jacobian's
/// singular values.
/// Drawn in memory as PNG or SVG bytes (by `path`'s extension), for [`write_figure`].
pub fn probe_figure(report: &ProbeReport, title: &str, path: &Path) -> std::io::Result<Vec<u8>> {
    let bytes = match Format::of(path)? {
        Format::Png => {
            let (w, h) = (1200, 500);
            let mut rgb = vec![0u8; (w * h * 3) as usize];
            draw_probe(
                BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area(),
                report,
                title,
            )?;
            encode_png(&rgb, w, h)?
        }
        Format::Svg => {
            let mut text = String::new();
            draw_probe(
                SVGBackend::with_string(&mut text, (1200, 500)).into_drawing_area(),
                report,
                title,
            )?;
            text.into_bytes()
        }
    };
    Ok(bytes)
}

/// A figure's file format, from its path's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// `.png` or `.svg` (any case); anything else is refused before drawing.
    pub fn of(path: &Path) -> std::io::Result<Format> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a figure is a .png or .svg file",
            )),
        }
    }
}

/// RGB pixels as PNG bytes.
fn encode_png(rgb: &[u8], width: u32, height: u32) -> std::io::Result<Vec<u8>> {
    let to_io = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(to_io)?;
        writer.write_image_data(rgb).map_err(to_io)?;
        writer.finish().map_err(to_io)?;
    }
    Ok(bytes)
}

/// Writes a figure drawn in memory, atomically: a figure that cannot be
/// written fails with the file system's own message, and never leaves half a file.
pub fn write_figure(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::fsutil::atomic_write(path, bytes)
}

fn draw_probe<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    report: &ProbeReport,
    title: &str,
) -> std::io::Result<()> {
    register_font();
    root.fill(&WHITE).map_err(to_io)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(to_io)?;
    let (left, right) = root.split_horizontally(600);

    let layers = report.layers.len();
    let names: Vec<String> = report.layers.iter().map(|l| l.name.clone()).collect();
    let series: [Series; 2] = [
        (
            "act_std",
            report
                .layers
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.act_std.map(|v| (i + 1, v)))
                .collect(),
            BLUE,
        ),
        (
            "preact_grad_std",
            report
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| (i + 1, l.preact_grad_std))
                .collect(),
            RED,
        ),
    ];
    let positive = series
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|p| p.1))
        .filter(|v| *v > 0.0 && v.is_finite());
    let (lo, hi) = positive.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo <= hi {
        (lo / 2.0, hi * 2.0)
    } else {
        (1e-6, 1.0)
    };
    let mut chart = ChartBuilder::on(&left)
        .caption("per-layer spread at initialisation", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(1usize..layers.max(2), (lo..hi).log_scale())
        .map_err(to_io)?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .x_labels(layers.max(2))
        .x_label_formatter(&|i| names.get(i.wrapping_sub(1)).cloned().unwrap_or_default())
        .y_desc("standard deviation")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(to_io)?;
    for (name, points, color) in series {
        let points: Vec<(usize, f64)> = points.into_iter().filter(|p| p.1 > 0.0).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(to_io)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(to_io)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(to_io)?;

    match &report.jacobian {
        Some(j) => {
            // On a log scale: the spread across orders of magnitude is the point.
            let logs: Vec<f64> = j
                .singular_values
                .iter()
                .filter(|&&v| v > 0.0)
                .map(|v| v.log10())
                .collect();
            let zeros = j.singular_values.len() - logs.len();
            let (lo, hi) = logs
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let (lo, hi) = if lo <= hi {
                (lo, hi.max(lo + 1e-9))
            } else {
                (-1.0, 1.0)
            };
            let bins = 40usize;
            let width = (hi - lo) / bins as f64;
            let mut counts = vec![0u32; bins];
            for v in &logs {
                counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
            }
            let top = counts.iter().copied().max().unwrap_or(1);
            let caption = format!(
                "singular values of J = ∂{}{}",
                j.of.replace(" wrt ", "/∂"),
                if zeros > 0 {
                    format!(" ({zeros} zero)")
                } else {
                    String::new()
                }
            );
            let mut chart = ChartBuilder::on(&right)
                .caption(caption, ("sans-serif", 18))
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(lo..hi + width, 0u32..top + top / 10 + 1)
                .map_err(to_io)?;
            chart
                .configure_mesh()
                .x_desc("log10 singular value")
                .y_desc("count")
                .draw()
                .map_err(to_io)?;
            chart
                .draw_series(counts.iter().enumerate().map(|(b, &c)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0), (x0 + width, c)], BLUE.mix(0.6).filled())
                }))
                .map_err(to_io)?;
        }
        None => {
            right
                .draw(&Text::new(
                    "Jacobian: needs an MLP with two hidden layers",
                    (150, 200),
                    ("sans-serif", 18),
                ))
                .map_err(to_io)?;
        }
    }
    root.present().map_err(to_io)
}

/// One curve: a label and its (step, value) points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(u64, f64)>,
}

/// Reads `metrics.jsonl` of `run`: one curve per tag that `wanted` accepts, labelled by its tag.
pub fn curves(run: &Path, wanted: impl Fn(&str) -> bool) -> std::io::Result<Vec<Curve>> {
    let text = std::fs::read_to_string(run.join(crate::run_dir::METRICS))?;
    let mut by_tag: std::collections::BTreeMap<String, Vec<(u64, f64)>> = Default::default();
    for line in text.lines() {
        let Ok(serde_json::Value::Object(record)) = serde_json::from_str(line) else {
            continue;
        };
        let Some(step) = record.get("step").and_then(|s| s.as_u64()) else {
            continue;
        };
        for (tag, value) in &record {
            if let (true, Some(v)) = (wanted(tag), value.as_f64()) {
                by_tag.entry(tag.clone()).or_default().push((step, v));
            }
        }
    }
    Ok(by_tag
        .into_iter()
        .map(|(label, points)| Curve { label, points })
        .collect())
}

/// Draws curves over steps as PNG or, for a `.svg` path, SVG bytes, for [`write_figure`].
pub fn line_figure(
    curves: &[Curve],
    title: &str,
    y_label: &str,
    log_y: bool,
    path: &Path,
) -> std::io::Result<Vec<u8>> {
    register_font();
    let bytes = match Format::of(path)? {
        Format::Svg => {
            let mut text = String::new();
            draw_lines(
                SVGBackend::with_string(&mut text, (1000, 600)).into_drawing_area(),
                curves,
                title,
                y_label,
                log_y,
            )?;
            text.into_bytes()
        }
        Format::Png => {
            let (w, h) = (1000, 600);
            let mut rgb = vec![0u8; (w * h * 3) as usize];
            draw_lines(
                BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area(),
                curves,
                title,
                y_label,
                log_y,
            )?;
            encode_png(&rgb, w, h)?
        }
    };
    Ok(bytes)
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    curves: &[Curve],
    title: &str,
    y_label: &str,
    log_y: bool,
) -> std::io::Result<()> {
    root.fill(&WHITE).map_err(to_io)?;
    let usable = |v: f64| v.is_finite() && (!log_y || v > 0.0);
    let all = curves
        .iter()
        .flat_map(|c| c.points.iter())
        .filter(|p| usable(p.1));
    let (x_max, lo, hi) = all.fold((1u64, f64::MAX, f64::MIN), |(x, lo, hi), p| {
        (x.max(p.0), lo.min(p.1), hi.max(p.1))
    });
    if lo > hi || !(hi - lo).is_finite() {
        return Err(std::io::Error::other("no finite range of values to draw"));
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80);
    let palette = |i: usize| Palette99::pick(i).to_rgba();
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(y_label)
                .y_label_formatter(&|v| axis_number(*v))
                .draw()
                .map_err(to_io)?;
            for (i, curve) in curves.iter().enumerate() {
                let color = palette(i);
                let points: Vec<(u64, f64)> = curve
                    .points
                    .iter()
                    .copied()
                    .filter(|p| usable(p.1))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(to_io)?
                    .label(curve.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(to_io)?;
        }};
    }
    if log_y {
        finish!(
            builder
                .build_cartesian_2d(0..x_max, (lo / 1.2..hi * 1.2).log_scale())
                .map_err(to_io)?
        );
    } else {
        finish!(
            builder
                .build_cartesian_2d(0..x_max, lo - pad..hi + pad)
                .map_err(to_io)?
        );
    }
    root.present().map_err(to_io)
}

/// An axis label: plain for ordinary magnitudes, scientific for tiny or huge ones.
fn axis_number(v: f64) -> String {
    if v == 0.0 || (1e-2..1e5).contains(&v.abs()) {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.1e}")
    }
}
