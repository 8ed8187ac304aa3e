//! The report's charts, drawn by the `plotters` crate (SVG backend), and
//! the digit thumbnails (SVG rectangles: images, not charts).
//!
//! plotters' SVG elements carry no data attributes, so each chart is wrapped
//! in a `<figure class="ridge|shares|epochs" data-layer="…">` that does, with
//! a hidden `<ul class="series">` listing what was drawn per class (class,
//! colour, records, share, points) for tests and scripts; the `<svg>` inside
//! is plotters' output, untouched, except in the data map ([`datamap`]),
//! where each point's `<circle>` gets a `<title>` (a tooltip) afterwards.
//!
//! Every chart takes the class names so that one class has one colour
//! ([`rgb`], [`colour`]) across the whole report; the data map colours by
//! correctness instead ([`correctness_rgb`]).
use crate::{Candidate, Dynamics, Images, Influence, Layer};
use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;

/// Tableau-10: distinguishable, colour-blind friendlier than a rainbow.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// Colour of the residual pseudo-source.
pub const RESIDUAL: &str = "#555555";
const RESIDUAL_RGB: RGBColor = RGBColor(0x55, 0x55, 0x55);
/// Colour of the batch-mode records of batches with several classes.
pub const MIXED: &str = "#b0b0b0";
const MIXED_RGB: RGBColor = RGBColor(0xb0, 0xb0, 0xb0);

/// One bar of the class-share chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Class(i32),
    /// Batch-mode records of batches with several classes (no label).
    Mixed,
    Residual,
}

/// The colour of class `label` (the palette, then golden-angle hues; the
/// residual's grey for a negative label).
pub fn rgb(label: i32) -> RGBColor {
    match usize::try_from(label) {
        Ok(i) if i < PALETTE.len() => PALETTE[i],
        Ok(i) => {
            let c = HSLColor((i as f64 * 137.508) % 360.0 / 360.0, 0.6, 0.45)
                .to_backend_color()
                .rgb;
            RGBColor(c.0, c.1, c.2)
        }
        Err(_) => RESIDUAL_RGB,
    }
}

/// [`rgb`] as CSS `#RRGGBB`, spelled as plotters' SVG backend spells it.
pub fn colour(label: i32) -> String {
    hex(rgb(label))
}

fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// HTML/XML escaping for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// The name of class `label`.
pub fn class_name(classes: &[String], label: i32) -> String {
    usize::try_from(label)
        .ok()
        .and_then(|i| classes.get(i))
        .cloned()
        .unwrap_or_else(|| label.to_string())
}

/// Width of every chart, pixels.
const W: u32 = 640;
const FONT: &str = "sans-serif";

type Drawing = Result<(), DrawingAreaErrorKind<std::io::Error>>;
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws on a white `size` SVG and returns plotters' `<svg>` document, or
/// the drawing error as text.
fn svg(size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> Drawing) -> Result<String, String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, size).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present())
            .map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

/// The `<figure>` around one chart: data attributes, the hidden series
/// list, plotters' SVG (or the error), a caption.
fn figure(
    kind: &str,
    layer: &str,
    attrs: &str,
    items: &str,
    chart: Result<String, String>,
    caption: &str,
) -> String {
    let body = chart.unwrap_or_else(|e| {
        format!(
            r#"<p class="warn">the {kind} chart could not be drawn: {}</p>"#,
            esc(&e)
        )
    });
    format!(
        r#"<figure class="{kind}" data-layer="{l}"{attrs}><ul class="series" hidden>{items}</ul>{body}<figcaption>{caption}</figcaption></figure>"#,
        l = esc(layer)
    )
}

/// The name of class `label`, marked when it is the predicted class.
fn tick_name(classes: &[String], label: i32, predicted: i32) -> String {
    let name = class_name(classes, label);
    if label == predicted {
        format!("{name} (predicted)")
    } else {
        name
    }
}

fn series_item(label: &str, c: RGBColor, strong: bool, attrs: &str, text: &str) -> String {
    format!(
        r#"<li class="series-item{p}" data-class="{label}" data-colour="{c}"{attrs}>{t}</li>"#,
        p = if strong { " predicted" } else { "" },
        c = hex(c),
        t = esc(text)
    )
}

/// Rows a ridge may rise above its baseline at the tallest density.
const OVERLAP: f64 = 1.8;
/// Pixels per ridge row.
const ROW: f64 = 34.0;

/// The ridge plot: one norm-weighted density of cosine per class, stacked,
/// on a shared cosine axis from −1 to 1 (one scale for every class); the
/// predicted class is drawn opaque with a heavy black outline.
pub fn ridge(layer: &Layer, classes: &[String], predicted: i32) -> String {
    let n = layer.ridges.len();
    let peak = layer
        .ridges
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    // Row i (from the top) sits on baseline n-1-i.
    let base = |i: usize| (n - 1 - i) as f64;
    let top = n.saturating_sub(1) as f64 + OVERLAP;
    let h = (ROW * top).ceil() as u32 + 110;
    let chart = svg((W, h), |root| {
        let mut chart = chart_on(
            root,
            format!(
                "Layer {}: norm-weighted cosine density per class",
                layer.name
            ),
            110,
        )
        .build_cartesian_2d(
            // Ticks every 0.5 from −1 to 1 (the end is past 1 so that 1 is one).
            (-1.0..1.0 + 1e-9).step(0.5),
            // Ticks on the baselines 0, 1, …
            (0.0..top).step(1.0),
        )?;
        let y_name = |v: &f64| {
            let i = n as f64 - 1.0 - v.round();
            if i < 0.0 {
                return String::new();
            }
            layer
                .ridges
                .get(i as usize)
                .map(|r| tick_name(classes, r.label, predicted))
                .unwrap_or_default()
        };
        mesh_style(&mut chart.configure_mesh())
            .x_desc("cosine(contribution of a record, refinement p of the probe)")
            .y_desc("class (density, one scale for all)")
            .x_labels(5)
            .y_labels(n + 2)
            .x_label_formatter(&|v| format!("{v}"))
            .y_label_formatter(&y_name)
            .draw()?;
        // From the top row down, so that lower ridges overlap upper ones.
        for (i, r) in layer.ridges.iter().enumerate() {
            let b = base(i);
            let c = rgb(r.label);
            let strong = r.label == predicted;
            let (fill, border) = if strong {
                (c.mix(0.8), BLACK.stroke_width(2))
            } else {
                (c.mix(0.45), c.stroke_width(1))
            };
            chart.draw_series(
                AreaSeries::new(
                    r.curve.iter().map(|&(x, d)| (x, b + d / peak * OVERLAP)),
                    b,
                    fill,
                )
                .border_style(border),
            )?;
        }
        Ok(())
    });
    let items: String = layer
        .ridges
        .iter()
        .map(|r| {
            series_item(
                &r.label.to_string(),
                rgb(r.label),
                r.label == predicted,
                &format!(
                    r#" data-records="{}" data-points="{}" data-bandwidth="{:.6}" data-weight="{:e}""#,
                    r.records,
                    r.curve.len(),
                    r.bandwidth,
                    r.weight
                ),
                &format!(
                    "class {}: {} records, total norm {:.4e}, bandwidth {:.3}",
                    class_name(classes, r.label),
                    r.records,
                    r.weight,
                    r.bandwidth
                ),
            )
        })
        .collect();
    let labels: Vec<String> = layer.ridges.iter().map(|r| r.label.to_string()).collect();
    figure(
        "ridge",
        &layer.name,
        &format!(
            r#" data-classes="{}" data-predicted="{predicted}""#,
            labels.join(",")
        ),
        &items,
        chart,
        &format!(
            "Each row: the density of the cosine between a record's contribution and the \
             probe's refinement, each record weighted by its norm (Gaussian kernel). The \
             predicted class ({}) is outlined in black.",
            esc(&class_name(classes, predicted))
        ),
    )
}

impl Source {
    fn rgb(self) -> RGBColor {
        match self {
            Source::Class(l) => rgb(l),
            Source::Mixed => MIXED_RGB,
            Source::Residual => RESIDUAL_RGB,
        }
    }

    /// Its tick label.
    fn name(self, classes: &[String], predicted: i32) -> String {
        match self {
            Source::Class(l) => tick_name(classes, l, predicted),
            Source::Mixed => "mixed batches".to_owned(),
            Source::Residual => "residual".to_owned(),
        }
    }

    /// Its `data-class`.
    fn attr(self) -> String {
        match self {
            Source::Class(l) => l.to_string(),
            Source::Mixed => "mixed".to_owned(),
            Source::Residual => "residual".to_owned(),
        }
    }
}

/// Horizontal bars of the class shares, the mixed batches (batch mode, when
/// there are any) and the residual, signed, with a zero line.
pub fn shares(layer: &Layer, classes: &[String], predicted: i32) -> String {
    let bars = share_bars(layer);
    let h = 22 * bars.len() as u32 + 110;
    let chart = svg((W, h), |root| {
        draw_shares(root, layer, &bars, classes, predicted)
    });
    let items: String = bars
        .iter()
        .map(|&(source, v)| {
            series_item(
                &source.attr(),
                source.rgb(),
                source == Source::Class(predicted),
                &format!(r#" data-share="{v}""#),
                &format!("{}: {v:.6}", source.name(classes, predicted)),
            )
        })
        .collect();
    figure(
        "shares",
        &layer.name,
        "",
        &items,
        chart,
        "Share of each class in the probe's refinement p (Σ of its records' ⟨c, p⟩ / ‖p‖²); \
         in batch mode, batches of several classes add up in one grey bar; \
         the residual is what the records do not explain (weight decay, lost records). \
         The predicted class is outlined in black.",
    )
}

/// The bars of [`shares`], from the top: the classes, the mixed batches
/// (when not 0), the residual.
fn share_bars(layer: &Layer) -> Vec<(Source, f64)> {
    let mut bars: Vec<(Source, f64)> = layer
        .shares
        .iter()
        .map(|(l, s)| (Source::Class(*l), *s))
        .collect();
    if layer.mixed_share != 0.0 {
        bars.push((Source::Mixed, layer.mixed_share));
    }
    bars.push((Source::Residual, layer.residual_share));
    bars
}

/// The share axis of [`shares`]: from 0 or below the smallest bar to above
/// the largest.
fn share_range(bars: &[(Source, f64)]) -> (f64, f64) {
    let lo = bars.iter().map(|b| b.1).fold(0.0_f64, f64::min);
    let hi = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
    let pad = ((hi - lo) * 0.15).max(1e-9);
    (if lo < 0.0 { lo - pad } else { lo }, hi + pad)
}

/// Corners of the bar of value `v` in segment `i` of `nb`.
fn bar_corners(i: i32, nb: usize, v: f64) -> [(f64, SegmentValue<i32>); 2] {
    [
        (v.min(0.0), SegmentValue::Exact(i)),
        (
            v.max(0.0),
            if i + 1 == nb as i32 {
                SegmentValue::Last
            } else {
                SegmentValue::Exact(i + 1)
            },
        ),
    ]
}

/// Draws the chart of [`shares`] on `root`.
fn draw_shares(
    root: &Area<'_>,
    layer: &Layer,
    bars: &[(Source, f64)],
    classes: &[String],
    predicted: i32,
) -> Drawing {
    let nb = bars.len();
    let (lo, hi) = share_range(bars);
    // Bar j (from the top) fills segment nb-1-j.
    let segment = |j: usize| (nb - 1 - j) as i32;
    let mut chart = chart_on(
        root,
        format!("Layer {}: class shares of the refinement", layer.name),
        110,
    )
    .build_cartesian_2d(lo..hi, (0..nb as i32 - 1).into_segmented())?;
    let y_name = |v: &SegmentValue<i32>| match v {
        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => usize::try_from(nb as i32 - 1 - i)
            .ok()
            .and_then(|j| bars.get(j))
            .map(|b| b.0.name(classes, predicted))
            .unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    mesh_style(&mut chart.configure_mesh())
        .disable_y_mesh()
        .x_desc(format!(
            "share of ‖p‖² = Σ ⟨c, p⟩ / ‖p‖² (all sum to {:.4})",
            layer.total_share
        ))
        .y_desc("source")
        .x_labels(7)
        .y_labels(nb + 1)
        .x_label_formatter(&|v| format!("{v:.2}"))
        .y_label_formatter(&y_name)
        .draw()?;
    let value_font = (FONT, 13).into_font();
    for (j, &(source, v)) in bars.iter().enumerate() {
        let i = segment(j);
        let corners = bar_corners(i, nb, v);
        let mut bar = Rectangle::new(corners.clone(), source.rgb().filled());
        bar.set_margin(3, 3, 0, 0);
        chart.draw_series(std::iter::once(bar))?;
        if source == Source::Class(predicted) {
            let mut outline = Rectangle::new(corners, BLACK.stroke_width(2));
            outline.set_margin(3, 3, 0, 0);
            chart.draw_series(std::iter::once(outline))?;
        }
        let (x, anchor) = if v < 0.0 {
            (v, HPos::Right)
        } else {
            (v, HPos::Left)
        };
        chart.draw_series(std::iter::once(Text::new(
            format!(" {v:+.3} "),
            (x, SegmentValue::CenterOf(i)),
            value_font.color(&BLACK).pos(Pos::new(anchor, VPos::Center)),
        )))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, SegmentValue::Exact(0)), (0.0, SegmentValue::Last)],
        BLACK.stroke_width(1),
    )))?;
    Ok(())
}

/// The axes of [`epochs`]: the epochs and labels with shares, the epoch
/// range with room for the legend, and the share range.
struct EpochAxes {
    epochs: Vec<i32>,
    labels: Vec<i32>,
    x0: f64,
    x1: f64,
    x_end: f64,
    lo: f64,
    hi: f64,
}

impl EpochAxes {
    fn of(layer: &Layer) -> Self {
        let epochs: Vec<i32> = layer.epoch_shares.keys().copied().collect();
        let labels: Vec<i32> = layer
            .epoch_shares
            .values()
            .flat_map(|m| m.keys().copied())
            .collect::<std::collections::BTreeSet<i32>>()
            .into_iter()
            .collect();
        let (e0, e1) = (
            epochs.first().copied().unwrap_or(0),
            epochs.last().copied().unwrap_or(0),
        );
        let (x0, x1) = if e1 > e0 {
            (e0 as f64, e1 as f64)
        } else {
            (e0 as f64 - 1.0, e1 as f64 + 1.0)
        };
        // Room on the right of the last epoch for the legend.
        let x_end = x1 + (x1 - x0) * 0.4;
        let (mut lo, mut hi) = layer
            .epoch_shares
            .values()
            .flat_map(|m| m.values().copied())
            .fold((0.0_f64, 0.0_f64), |(a, b), v| (a.min(v), b.max(v)));
        if hi - lo < 1e-12 {
            hi = lo + 1.0;
        }
        let pad = (hi - lo) * 0.05;
        lo -= pad;
        hi += pad;
        Self {
            epochs,
            labels,
            x0,
            x1,
            x_end,
            lo,
            hi,
        }
    }
}

/// The share of class `l` in epoch `e` (0 when none).
fn epoch_share(layer: &Layer, e: i32, l: i32) -> f64 {
    layer
        .epoch_shares
        .get(&e)
        .and_then(|m| m.get(&l))
        .copied()
        .unwrap_or(0.0)
}

/// Class shares per epoch: one line per class over the epochs.
pub fn epochs(layer: &Layer, classes: &[String], predicted: i32) -> String {
    let axes = EpochAxes::of(layer);
    let epochs = &axes.epochs;
    let chart = svg((W, 320), |root| {
        draw_epochs(root, layer, &axes, classes, predicted)
    });
    let items: String = axes
        .labels
        .iter()
        .map(|&l| {
            series_item(
                &l.to_string(),
                rgb(l),
                l == predicted,
                &format!(r#" data-points="{}""#, epochs.len()),
                &format!(
                    "class {}: {}",
                    class_name(classes, l),
                    epochs
                        .iter()
                        .map(|&e| format!("epoch {e} {:.4}", epoch_share(layer, e, l)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
        .collect();
    figure(
        "epochs",
        &layer.name,
        &format!(r#" data-epochs="{}""#, epochs.len()),
        &items,
        chart,
        "Each class's share of the refinement, by the epoch in which its records were \
         made; the predicted class is drawn thicker.",
    )
}

/// Draws the chart of [`epochs`] on `root`.
fn draw_epochs(
    root: &Area<'_>,
    layer: &Layer,
    axes: &EpochAxes,
    classes: &[String],
    predicted: i32,
) -> Drawing {
    let (epochs, labels) = (&axes.epochs, &axes.labels);
    let (x0, x1, x_end, lo, hi) = (axes.x0, axes.x1, axes.x_end, axes.lo, axes.hi);
    let is_epoch = |v: &f64| (v - v.round()).abs() < 1e-9 && epochs.contains(&(v.round() as i32));
    let mut chart = chart_on(
        root,
        format!("Layer {}: class shares per epoch", layer.name),
        70,
    )
    .build_cartesian_2d((x0..x_end).step(1.0), lo..hi)?;
    mesh_style(&mut chart.configure_mesh())
        .x_desc("epoch")
        .y_desc("share of ‖p‖²")
        .x_labels(10)
        .y_labels(6)
        .x_label_formatter(&|v| {
            if is_epoch(v) {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    chart.draw_series(DashedLineSeries::new(
        [(x0, 0.0), (x1, 0.0)],
        4,
        3,
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    for &l in labels {
        let c = rgb(l);
        let strong = l == predicted;
        chart
            .draw_series(
                LineSeries::new(
                    epochs.iter().map(|&e| (e as f64, epoch_share(layer, e, l))),
                    c.stroke_width(if strong { 4 } else { 2 }),
                )
                .point_size(if strong { 4 } else { 3 }),
            )?
            .label(tick_name(classes, l, predicted))
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 16, y + 4)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .legend_area_size(22)
        .label_font((FONT, 14))
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

/// Correctness 0, ½ and 1 of the data map: red, amber, green.
const CORRECTNESS: [RGBColor; 3] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xe8, 0xa3, 0x17),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// The colour of a correctness in 0..1 (clamped; NaN as 0): linear from
/// red (never right) through amber (½) to green (always right).
pub fn correctness_rgb(c: f64) -> RGBColor {
    let c = if c.is_nan() { 0.0 } else { c.clamp(0.0, 1.0) };
    let (a, b, t) = if c <= 0.5 {
        (CORRECTNESS[0], CORRECTNESS[1], c * 2.0)
    } else {
        (CORRECTNESS[1], CORRECTNESS[2], c * 2.0 - 1.0)
    };
    let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// [`correctness_rgb`] as CSS `#RRGGBB`.
pub fn correctness_colour(c: f64) -> String {
    hex(correctness_rgb(c))
}

/// Radius of a data map point, pixels.
const DOT: i32 = 3;

/// The data map: one point per training instance at (variability,
/// confidence), coloured by correctness ([`correctness_rgb`]), drawn in the
/// order of `d.points`, each with a `<title>` naming the instance; dashed
/// guide lines at the region thresholds (variability `d.ambiguous`,
/// confidence `d.easy` left of it) and the regions' names.
pub fn datamap(d: &Dynamics, classes: &[String]) -> String {
    let n = d.points.len();
    let x_max = d
        .points
        .iter()
        .map(|p| p.variability)
        .fold(d.ambiguous, f64::max)
        * 1.1;
    let x_max = if x_max.is_finite() && x_max > 0.0 {
        x_max
    } else {
        1.0
    };
    let (y0, y1) = (-0.02, 1.02);
    let chart = svg((W, 480), |root| {
        let mut chart = chart_on(
            root,
            "Data map: confidence and variability of each training instance",
            70,
        )
        .build_cartesian_2d(0.0..x_max, y0..y1)?;
        mesh_style(&mut chart.configure_mesh())
            .x_desc("variability (std. over epochs of the probability of the label)")
            .y_desc("confidence (mean probability of the label)")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.2}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()?;
        let guide = BLACK.mix(0.6).stroke_width(1);
        chart.draw_series(DashedLineSeries::new(
            [(d.ambiguous, y0), (d.ambiguous, y1)],
            6,
            4,
            guide,
        ))?;
        chart.draw_series(DashedLineSeries::new(
            [(0.0, d.easy), (d.ambiguous, d.easy)],
            6,
            4,
            guide,
        ))?;
        let font = (FONT, 14).into_font();
        let left = font
            .color(&BLACK.mix(0.7))
            .pos(Pos::new(HPos::Left, VPos::Top));
        let pad = x_max * 0.01;
        chart.draw_series([
            Text::new("easy".to_owned(), (pad, y1 - 0.01), left.clone()),
            Text::new("hard".to_owned(), (pad, d.easy - 0.02), left.clone()),
            Text::new("ambiguous".to_owned(), (d.ambiguous + pad, y1 - 0.01), left),
        ])?;
        chart.draw_series(d.points.iter().map(|p| {
            Circle::new(
                (p.variability, p.confidence),
                DOT,
                correctness_rgb(p.correctness).mix(0.8).filled(),
            )
        }))?;
        Ok(())
    });
    let titles: Vec<String> = d
        .points
        .iter()
        .map(|p| {
            format!(
                "instance {}, class {}: confidence {:.3}, variability {:.3}, correctness {:.2} ({} epochs, {})",
                p.instance_id,
                class_name(classes, p.label),
                p.confidence,
                p.variability,
                p.correctness,
                p.epochs,
                p.region
            )
        })
        .collect();
    let body = match chart {
        Ok(svg) => titled(&svg, &titles),
        Err(e) => format!(
            r#"<p class="warn">the data map could not be drawn: {}</p>"#,
            esc(&e)
        ),
    };
    let legend: String = [0.0, 0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|&c| {
            format!(
                r#"<span class="legend-correctness" data-correctness="{c}"><span class="sw" style="background:{}"></span>{c}</span>"#,
                correctness_colour(c)
            )
        })
        .collect();
    format!(
        r#"<figure class="datamap" data-points="{n}" data-ambiguous="{a}" data-easy="{e}">{body}<div class="legend">correctness: {legend}</div><figcaption>Each point is one training instance: the mean (confidence) and the standard deviation (variability) over epochs of the probability the model gave its label, coloured by the fraction of epochs in which it predicted the label. Ambiguous: variability ≥ {a}; else easy when confidence ≥ {e}, hard below (often a wrong label). Hover a point for its instance.</figcaption></figure>"#,
        a = d.ambiguous,
        e = d.easy
    )
}

/// `svg` with `titles[i]` as the `<title>` of its i-th `<circle>`; `svg`
/// as it is when the number of circles differs.
fn titled(svg: &str, titles: &[String]) -> String {
    let parts: Vec<&str> = svg.split("<circle ").collect();
    if parts.len() != titles.len() + 1 {
        return svg.to_owned();
    }
    let mut out =
        String::with_capacity(svg.len() + titles.iter().map(|t| t.len() + 30).sum::<usize>());
    out.push_str(parts[0]);
    for (part, title) in parts[1..].iter().zip(titles) {
        out.push_str("<circle ");
        match part.split_once("/>") {
            Some((attrs, rest)) => {
                let _ = write!(out, "{attrs}><title>{}</title></circle>{rest}", esc(title));
            }
            None => out.push_str(part),
        }
    }
    out
}

/// A greyscale image as SVG rectangles (`pixels` in 0..1, `[C, H, W]`; the
/// first channel is drawn).
pub fn image(pixels: &[f32], shape: &[usize], size: f64) -> String {
    let (h, w) = match shape {
        [_, h, w] | [h, w] => (*h, *w),
        _ => (1, pixels.len()),
    };
    let cell = size / h.max(w).max(1) as f64;
    let mut s = format!(
        r#"<svg class="digit" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {vw} {vh}" width="{vw}" height="{vh}" shape-rendering="crispEdges"><rect width="{vw}" height="{vh}" fill="white"/>"#,
        vw = cell * w as f64,
        vh = cell * h as f64
    );
    for r in 0..h {
        for c in 0..w {
            let v = pixels
                .get(r * w + c)
                .copied()
                .unwrap_or(0.0)
                .clamp(0.0, 1.0);
            if v <= 0.0 {
                continue;
            }
            let g = (255.0 * (1.0 - v)).round() as u8;
            let _ = write!(
                s,
                r#"<rect x="{:.2}" y="{:.2}" width="{cell:.2}" height="{cell:.2}" fill="rgb({g},{g},{g})"/>"#,
                c as f64 * cell,
                r as f64 * cell
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// A gallery of proponents or opponents: image (when available), label and
/// influence of each instance.
pub fn gallery(
    kind: &str,
    layer: &str,
    items: &[Influence],
    classes: &[String],
    images: Option<&Images>,
) -> String {
    let mut s = format!(
        r#"<div class="gallery" data-kind="{kind}" data-layer="{l}" data-items="{n}">"#,
        l = esc(layer),
        n = items.len()
    );
    for it in items {
        let pic = thumbnail(images, it.instance_id);
        let _ = write!(
            s,
            r#"<figure class="gallery-item" data-instance="{id}" data-label="{lab}" data-influence="{inf}" style="border-color:{c}">{pic}<figcaption>#{rank} id {id}<br><span style="color:{c}">class {nm}</span><br>{inf:+.4}</figcaption></figure>"#,
            id = it.instance_id,
            lab = it.label,
            inf = it.influence,
            c = colour(it.label),
            rank = it.rank,
            nm = esc(&class_name(classes, it.label)),
        );
    }
    s.push_str("</div>");
    s
}

/// An instance's 64-pixel image, or nothing when the run has no images of it.
fn thumbnail(images: Option<&Images>, instance_id: i64) -> String {
    images
        .and_then(|im| {
            im.pixels
                .get(&instance_id)
                .map(|p| image(p, &im.shape, 64.0))
        })
        .unwrap_or_default()
}

/// A gallery of mislabel candidates: image (when available), given label,
/// class predicted at the last presentation and score of each instance.
pub fn candidates(items: &[Candidate], classes: &[String], images: Option<&Images>) -> String {
    let mut s = format!(
        r#"<div class="gallery mislabel" data-kind="mislabel" data-items="{}">"#,
        items.len()
    );
    for it in items {
        let pic = thumbnail(images, it.instance_id);
        let tip = format!(
            "mean loss {:.4}, confidence {:.3}, correctness {:.2}, probability of the label at the last presentation {:.3}",
            it.score, it.confidence, it.correctness, it.p_label
        );
        let _ = write!(
            s,
            r#"<figure class="gallery-item" data-instance="{id}" data-label="{lab}" data-predicted="{pr}" data-score="{sc}" data-rank="{rank}" title="{tip}" style="border-color:{c}">{pic}<figcaption>#{rank} id {id}<br><span style="color:{c}">given {nm}</span><br><span style="color:{pc}">predicted {pn}</span><br>score {sc:.3}</figcaption></figure>"#,
            id = it.instance_id,
            lab = it.label,
            pr = it.predicted,
            sc = it.score,
            rank = it.rank,
            tip = esc(&tip),
            c = colour(it.label),
            pc = colour(it.predicted),
            nm = esc(&class_name(classes, it.label)),
            pn = esc(&class_name(classes, it.predicted)),
        );
    }
    s.push_str("</div>");
    s
}

/// A chart on `root` in the house style: `title` in 19 points, a 10-pixel
/// margin, 45 pixels for the x labels and `y_labels` for the y ones.
fn chart_on<'a, 'b, 'x>(
    root: &'a Area<'x>,
    title: impl AsRef<str>,
    y_labels: u32,
) -> ChartBuilder<'a, 'b, SVGBackend<'x>> {
    let mut chart = ChartBuilder::on(root);
    chart
        .caption(title, (FONT, 19))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(y_labels);
    chart
}

/// The house style of a chart's mesh: 14-point labels, 15-point axis
/// descriptions, faint bold lines and no light ones.
fn mesh_style<'m, 'a, 'b, X: Ranged, Y: Ranged, DB: DrawingBackend>(
    mesh: &'m mut MeshStyle<'a, 'b, X, Y, DB>,
) -> &'m mut MeshStyle<'a, 'b, X, Y, DB> {
    mesh.label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{MapPoint, Ridge};
    use std::collections::BTreeMap;

    /// Opening tags `<{start}…>` in `s`.
    fn tags<'a>(s: &'a str, start: &str) -> Vec<&'a str> {
        s.match_indices(start)
            .map(|(i, _)| &s[i..=i + s[i..].find('>').unwrap()])
            .collect()
    }

    fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
        let key = format!(" {name}=\"");
        let i = tag.find(&key).unwrap() + key.len();
        &tag[i..i + tag[i..].find('"').unwrap()]
    }

    fn points(tag: &str) -> Vec<(i32, i32)> {
        attr(tag, "points")
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    /// Three classes (0, 1, 12: a palette colour and a generated one), two
    /// epochs, class 1 predicted.
    fn layer() -> Layer {
        let grid = |mu: f64, s: f64| -> Vec<(f64, f64)> {
            (0..51)
                .map(|i| {
                    let c = -1.0 + 2.0 * i as f64 / 50.0;
                    (c, (-(c - mu) * (c - mu) / (2.0 * s * s)).exp())
                })
                .collect()
        };
        let ridge = |label, mu, s, records| Ridge {
            label,
            curve: grid(mu, s),
            bandwidth: s,
            weight: 1.0,
            records,
        };
        let mut epoch_shares = BTreeMap::new();
        epoch_shares.insert(0, BTreeMap::from([(0, 0.1), (1, 0.3), (12, -0.05)]));
        epoch_shares.insert(1, BTreeMap::from([(0, 0.2), (1, 0.4), (12, 0.0)]));
        Layer {
            name: "fc<1>".into(),
            p_norm: 1.0,
            records: 6,
            shares: BTreeMap::from([(0, 0.3), (1, 0.7), (12, -0.05)]),
            mixed_share: 0.0,
            residual_share: 0.05,
            total_share: 1.0,
            epoch_shares,
            ridges: vec![
                ridge(0, -0.5, 0.2, 3),
                ridge(1, 0.5, 0.1, 2),
                ridge(12, 0.0, 0.3, 1),
            ],
            proponents: vec![],
            opponents: vec![],
        }
    }

    fn classes() -> Vec<String> {
        (0..13).map(|i| format!("c{i}")).collect()
    }

    /// The plotters `<svg>` of a figure, checked to be one whole document.
    fn svg(figure: &str) -> &str {
        assert_eq!(figure.matches("<svg ").count(), 1, "{figure}");
        let i = figure.find("<svg ").unwrap();
        &figure[i..i + figure[i..].find("</svg>").unwrap()]
    }

    /// Six instances: variability and confidence rising together except
    /// for the last two (one exactly on each threshold), correctness from 0
    /// to 1.
    fn dynamics() -> Dynamics {
        let point = |id: i64, variability: f64, confidence: f64, correctness: f64| MapPoint {
            instance_id: id,
            label: (id % 13) as i32,
            epochs: 4,
            confidence,
            variability,
            correctness,
            region: if variability >= 0.2 {
                "ambiguous"
            } else if confidence >= 0.5 {
                "easy"
            } else {
                "hard"
            }
            .into(),
        };
        Dynamics {
            points: vec![
                point(3, 0.01, 0.05, 0.0),
                point(7, 0.05, 0.3, 0.25),
                point(12, 0.1, 0.6, 0.5),
                point(20, 0.3, 0.9, 0.75),
                point(21, 0.2, 0.2, 1.0),
                point(40, 0.02, 0.5, 1.0),
            ],
            ambiguous: 0.2,
            easy: 0.5,
            candidates: vec![],
        }
    }

    #[test]
    fn datamap_draws_one_titled_point_per_instance_placed_by_its_values() {
        let d = dynamics();
        let html = datamap(&d, &classes());
        assert!(html.starts_with(
            r#"<figure class="datamap" data-points="6" data-ambiguous="0.2" data-easy="0.5">"#
        ));
        let s = svg(&html);
        let circles = tags(s, "<circle ");
        assert_eq!(circles.len(), d.points.len());
        let at = |t: &str| -> (i32, i32) {
            (
                attr(t, "cx").parse().unwrap(),
                attr(t, "cy").parse().unwrap(),
            )
        };
        for (i, (p, c)) in d.points.iter().zip(&circles).enumerate() {
            // Coloured by correctness, in drawing order.
            assert_eq!(attr(c, "fill"), correctness_colour(p.correctness), "{i}");
            // Its tooltip names the instance.
            let rest = &s[s.find(c).unwrap() + c.len()..];
            let title = &rest[..rest.find("</circle>").unwrap()];
            assert!(
                title.starts_with(&format!(
                    "<title>instance {}, class c{}: confidence {:.3}, variability {:.3}",
                    p.instance_id, p.label, p.confidence, p.variability
                )),
                "{title}"
            );
            // Positions are monotone in the values: right for more
            // variability, up (smaller y) for more confidence.
            for (q, e) in d.points.iter().zip(&circles) {
                let ((x1, y1), (x2, y2)) = (at(c), at(e));
                assert_eq!(
                    x1.cmp(&x2),
                    p.variability.total_cmp(&q.variability),
                    "{p:?} {q:?}"
                );
                assert_eq!(
                    y2.cmp(&y1),
                    p.confidence.total_cmp(&q.confidence),
                    "{p:?} {q:?}"
                );
            }
        }
        // The scale runs from red (never right) to green (always right).
        assert_eq!(correctness_colour(0.0), "#D62728");
        assert_eq!(correctness_colour(1.0), "#2CA02C");
        assert_eq!(correctness_colour(f64::NAN), "#D62728");
        // Dashed guide lines through the points on the thresholds: the
        // vertical one at variability 0.2 (instance 21), the horizontal one
        // at confidence 0.5 (instance 40), left of it.
        let (xv, _) = at(circles[4]);
        let (_, yh) = at(circles[5]);
        let guides: Vec<Vec<(i32, i32)>> = tags(s, "<polyline ")
            .into_iter()
            .filter(|p| attr(p, "stroke") == "#000000" && attr(p, "opacity") == "0.6")
            .map(points)
            .collect();
        let vertical = guides
            .iter()
            .filter(|g| g.iter().all(|&(x, _)| x == xv))
            .count();
        let horizontal: Vec<&Vec<(i32, i32)>> = guides
            .iter()
            .filter(|g| g.iter().all(|&(_, y)| y == yh))
            .collect();
        assert!(vertical >= 3, "{guides:?}");
        assert!(horizontal.len() >= 3, "{guides:?}");
        assert!(
            horizontal
                .iter()
                .flat_map(|g| g.iter())
                .all(|&(x, _)| x <= xv)
        );
        assert_eq!(vertical + horizontal.len(), guides.len());
        for name in ["easy", "hard", "ambiguous"] {
            assert!(s.contains(&format!(">\n{name}\n<")), "{name}");
        }
        assert!(s.contains(">\nvariability ("));
        assert!(s.contains(">\nconfidence ("));
    }

    #[test]
    fn candidates_show_given_and_predicted_class_and_score() {
        let items: Vec<Candidate> = (0..3)
            .map(|i| Candidate {
                rank: i + 1,
                instance_id: 10 + i,
                label: 1,
                predicted: 12,
                score: 3.0 - i as f64,
                confidence: 0.1,
                correctness: 0.0,
                p_label: 0.05,
            })
            .collect();
        let images = crate::Images {
            shape: vec![1, 2, 2],
            pixels: std::collections::HashMap::from([(10, vec![1.0, 0.0, 0.5, 0.0])]),
        };
        let html = candidates(&items, &classes(), Some(&images));
        assert!(
            html.starts_with(
                r#"<div class="gallery mislabel" data-kind="mislabel" data-items="3">"#
            )
        );
        let figs = tags(&html, "<figure ");
        assert_eq!(figs.len(), 3);
        for (f, it) in figs.iter().zip(&items) {
            assert_eq!(attr(f, "data-instance"), it.instance_id.to_string());
            assert_eq!(attr(f, "data-predicted"), "12");
            assert_eq!(attr(f, "data-score"), it.score.to_string());
        }
        // Only instance 10 has pixels.
        assert_eq!(html.matches("<svg class=\"digit\"").count(), 1);
        assert_eq!(html.matches("given c1</span>").count(), 3);
        assert_eq!(html.matches("predicted c12</span>").count(), 3);
        assert!(html.contains("score 3.000</figcaption>"));
    }

    #[test]
    fn colours_are_one_per_class_and_spelled_as_plotters_does() {
        assert_eq!(colour(0), "#1F77B4");
        assert_eq!(colour(-1), RESIDUAL);
        let all: std::collections::BTreeSet<String> = (0..20).map(colour).collect();
        assert_eq!(all.len(), 20);
        assert!(all.iter().all(|c| c.len() == 7 && c.starts_with('#')));
    }

    #[test]
    fn ridge_draws_one_density_per_class_scaled_to_the_shared_peak() {
        let l = layer();
        let html = ridge(&l, &classes(), 1);
        assert!(html.starts_with(r#"<figure class="ridge" data-layer="fc&lt;1&gt;" data-classes="0,1,12" data-predicted="1">"#));
        let s = svg(&html);
        let polygons = tags(s, "<polygon ");
        assert_eq!(polygons.len(), 3);
        let mut baselines = Vec::new();
        let mut heights = Vec::new();
        for (r, p) in l.ridges.iter().zip(&polygons) {
            // Drawn top row first, each in its class's colour.
            assert_eq!(attr(p, "fill"), colour(r.label));
            let pts = points(p);
            assert_eq!(pts.len(), r.curve.len() + 2);
            let base = pts[pts.len() - 1].1;
            baselines.push(base);
            // Peak position: the grid point of the largest density.
            let (imax, _) =
                r.curve.iter().enumerate().fold(
                    (0, f64::MIN),
                    |a, (i, &(_, d))| if d > a.1 { (i, d) } else { a },
                );
            let top = pts[..r.curve.len()].iter().map(|p| p.1).min().unwrap();
            assert_eq!(pts[imax].1, top);
            heights.push(base - top);
            // x spans −1 .. 1 on every row.
            assert_eq!(
                pts[0].0,
                polygons.iter().map(|q| points(q)[0].0).min().unwrap()
            );
        }
        assert!(baselines.windows(2).all(|w| w[0] < w[1]), "{baselines:?}");
        // Every curve peaks at 1 here: one shared scale, equal heights (±1 px).
        assert!(
            heights.iter().all(|h| (h - heights[0]).abs() <= 1),
            "{heights:?}"
        );
        // Only the predicted class has the black outline.
        let black: Vec<&str> = tags(s, "<polyline ")
            .into_iter()
            .filter(|p| attr(p, "stroke") == "#000000" && attr(p, "stroke-width") == "2")
            .collect();
        assert_eq!(black.len(), 1);
        assert_eq!(points(black[0]).len(), l.ridges[1].curve.len());
        assert_eq!(html.matches(r#"class="series-item predicted""#).count(), 1);
        assert!(s.contains("c1 (predicted)"));
    }

    #[test]
    fn shares_draw_one_bar_per_source_with_signed_lengths() {
        let l = layer();
        let html = shares(&l, &classes(), 1);
        let s = svg(&html);
        let mut width = BTreeMap::new();
        for (label, v) in l
            .shares
            .iter()
            .map(|(l, v)| (*l, *v))
            .chain([(-1, l.residual_share)])
        {
            let bars: Vec<&str> = tags(s, "<rect ")
                .into_iter()
                .filter(|b| attr(b, "fill") == colour(label))
                .collect();
            assert_eq!(bars.len(), 1, "{label}");
            width.insert(label, (attr(bars[0], "width").parse::<f64>().unwrap(), v));
        }
        // Bar lengths are proportional to |share| (pixels, ±1.5).
        let (w1, v1) = width[&1];
        for (w, v) in width.values() {
            assert!((w - v.abs() / v1 * w1).abs() <= 1.5, "{w} {v}");
        }
        let listed: f64 = tags(&html, "<li ")
            .iter()
            .map(|t| attr(t, "data-share").parse::<f64>().unwrap())
            .sum();
        assert!((listed - 1.0).abs() < 1e-12);
    }

    /// Batch mode with mixed batches: their share gets its own grey bar,
    /// listed as `mixed`, between the classes and the residual; without
    /// mixed batches there is no such bar.
    #[test]
    fn mixed_batches_get_their_own_bar() {
        let mut l = layer();
        l.shares.insert(1, 0.6);
        l.mixed_share = 0.1;
        let html = shares(&l, &classes(), 1);
        let s = svg(&html);
        let fill = |c: &str| {
            tags(s, "<rect ")
                .into_iter()
                .filter(|b| attr(b, "fill").eq_ignore_ascii_case(c))
                .count()
        };
        assert_eq!(fill(MIXED), 1);
        assert_eq!(fill(RESIDUAL), 1);
        let items = tags(&html, "<li ");
        let order: Vec<&str> = items.iter().map(|t| attr(t, "data-class")).collect();
        assert_eq!(order, ["0", "1", "12", "mixed", "residual"]);
        let listed: f64 = items
            .iter()
            .map(|t| attr(t, "data-share").parse::<f64>().unwrap())
            .sum();
        assert!((listed - 1.0).abs() < 1e-12);
        assert!(s.contains("mixed batches"));

        l.mixed_share = 0.0;
        let html = shares(&l, &classes(), 1);
        assert!(!html.contains(r#"data-class="mixed""#));
    }

    #[test]
    fn epochs_draw_one_line_per_class_with_one_point_per_epoch() {
        let l = layer();
        let html = epochs(&l, &classes(), 1);
        assert!(html.contains(r#"data-epochs="2""#));
        let s = svg(&html);
        for label in [0, 1, 12] {
            let lines: Vec<&str> = tags(s, "<polyline ")
                .into_iter()
                .filter(|p| attr(p, "stroke") == colour(label))
                .collect();
            assert_eq!(lines.len(), 1, "{label}");
            let pts = points(lines[0]);
            assert_eq!(pts.len(), 2);
            // Higher share, higher on the page (smaller y).
            let (a, b) = (l.epoch_shares[&0][&label], l.epoch_shares[&1][&label]);
            assert_eq!(pts[0].1 > pts[1].1, a < b, "{label}");
            // The legend names the class and shows its colour.
            assert!(s.contains(&format!(">\nc{label}")), "{label}");
            let swatches: Vec<&str> = tags(s, "<rect ")
                .into_iter()
                .filter(|r| attr(r, "fill") == colour(label))
                .collect();
            assert_eq!(swatches.len(), 1, "{label}");
            assert!(attr(swatches[0], "width").parse::<i32>().unwrap() > 0);
        }
    }
}
