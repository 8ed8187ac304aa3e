//! `reptrace report`: a short digits run is trained, attributed for one probe
//! and reported by the binary; the HTML's structure is counted through the
//! data attributes the report puts on purpose, and checked against the
//! digits data read independently (reptrace-tch's loader); then the page is
//! rendered by a real headless Chromium. Its training-dynamics section (data
//! map, mislabel candidates) is checked against `reptrace query` and the
//! data, and a run trained with `--no-examples` gets the one-line notice.
#![cfg(feature = "tch")]
use reptrace_testkit::cli::{Cli, text};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn cli(dir: &Path) -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_reptrace")).in_dir(dir)
}

/// The first test row of the digits (probe id = row).
const PROBE: i64 = 1437;
const K: usize = 5;
const EPOCHS: usize = 2;

/// One trained, attributed and reported run shared by the tests.
struct Fixture {
    _dir: tempfile::TempDir,
    run: PathBuf,
    html_path: PathBuf,
    html: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let epochs = EPOCHS.to_string();
        train_run(dir.path(), &["--epochs", &epochs]);
        let probe = PROBE.to_string();
        let k = K.to_string();
        let o = cli(dir.path()).output(&[
            "report",
            "run",
            "--probe",
            &probe,
            "--k",
            &k,
            "--out",
            "out/r.html",
        ]);
        assert!(o.status.success(), "report: {}", text(&o.stderr));
        let stdout = text(&o.stdout);
        // No attribution step: the contributions are computed on demand.
        assert!(!stdout.contains("attribut"), "{stdout}");
        let m = reptrace_format::Manifest::load(&dir.path().join("run")).unwrap();
        assert!(m.attributions.is_empty(), "report materialised nothing");
        assert!(stdout.contains("report: out/r.html"), "{stdout}");
        let html_path = dir.path().join("out/r.html");
        let html = std::fs::read_to_string(&html_path).unwrap();
        Fixture {
            run: dir.path().join("run"),
            _dir: dir,
            html_path,
            html,
        }
    })
}

/// Opening tags `<{start}…>` (start includes the tag name and first attribute).
fn tags<'a>(html: &'a str, start: &str) -> Vec<&'a str> {
    html.match_indices(start)
        .map(|(i, _)| {
            let end = html[i..].find('>').unwrap();
            &html[i..=i + end]
        })
        .collect()
}

/// Trains the digits into `dir/run` in batches of 64, with `flags`.
fn train_run(dir: &Path, flags: &[&str]) {
    let mut args = vec!["train", "--batch-size", "64", "--out", "run"];
    args.extend_from_slice(flags);
    cli(dir).ok(&args);
}

/// The text from each `<{start}` to the next `close`.
fn blocks<'a>(html: &'a str, start: &str, close: &str) -> Vec<&'a str> {
    html.match_indices(start)
        .map(|(i, _)| {
            let end = html[i..].find(close).unwrap();
            &html[i..i + end]
        })
        .collect()
}

/// The plotters `<svg>` document inside a chart's figure.
fn svg_of(figure: &str) -> &str {
    let i = figure.find("<svg ").unwrap();
    let end = figure[i..].find("</svg>").unwrap();
    &figure[i..i + end]
}

/// Points of a `<polygon>` or `<polyline>`.
fn points(tag: &str) -> usize {
    attr(tag, "points").split_whitespace().count()
}

fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=\"");
    let i = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + key.len();
    let end = tag[i..].find('"').unwrap();
    &tag[i..i + end]
}

/// The header's class probability equals the softmax of the final network's
/// output, computed here by libtorch from `final` weights and the data row.
#[test]
fn report_probability_matches_the_final_network() {
    let f = fixture();
    let m = reptrace_format::Manifest::load(&f.run).unwrap();
    let (rel, _) = m.latest_weights().unwrap();
    let saved =
        tch::Tensor::read_safetensors(reptrace_format::Manifest::resolve(&f.run, rel)).unwrap();
    let net = reptrace_tch::Network::new(&m.model, 0, tch::Device::Cpu).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in net.parameters() {
            let (_, s) = saved.iter().find(|(n, _)| *n == name).unwrap();
            t.copy_(s);
        }
    });
    let digits = reptrace_tch::data::digits().unwrap();
    let dim: usize = m.model.input_shape.iter().product();
    let row = PROBE as usize;
    let mut shape = vec![1i64];
    shape.extend(m.model.input_shape.iter().map(|&d| d as i64));
    let x = tch::Tensor::from_slice(&digits.features[row * dim..(row + 1) * dim]).view(&shape[..]);
    let (logits, _) = net.forward(&x, false, false).unwrap();
    let probs: Vec<f64> = Vec::try_from(
        logits
            .to_kind(tch::Kind::Double)
            .softmax(-1, tch::Kind::Double)
            .view([-1]),
    )
    .unwrap();
    let predicted = (0..probs.len())
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .unwrap();

    let span = tags(&f.html, "<span class=\"probability\"");
    assert_eq!(span.len(), 1, "one probability in the header");
    let shown: f64 = attr(span[0], "data-predicted").parse().unwrap();
    let shown_true: f64 = attr(span[0], "data-true").parse().unwrap();
    let label = digits.labels[row] as usize;
    assert!(
        (shown - probs[predicted]).abs() < 1e-4,
        "report {shown}, libtorch {}",
        probs[predicted]
    );
    assert!(
        (shown_true - probs[label]).abs() < 1e-4,
        "report {shown_true}, libtorch {}",
        probs[label]
    );
    let body = tags(&f.html, "<body");
    assert_eq!(attr(body[0], "data-probe"), PROBE.to_string());
}

#[test]
fn report_structure_matches_the_run_and_the_data() {
    let f = fixture();
    let html = &f.html;
    let manifest = reptrace_format::Manifest::load(&f.run).unwrap();
    let traced: Vec<String> = manifest
        .model
        .traced_layers()
        .map(|l| l.name().to_owned())
        .collect();
    assert_eq!(traced, ["fc1", "fc2", "fc3"]);
    let digits = reptrace_tch::data::digits().unwrap();
    let train_classes: BTreeSet<i32> = digits.labels[..digits.n_train].iter().copied().collect();

    // Self-contained: no external resources.
    for bad in ["src=\"http", "href=\"http", "<link ", "@import"] {
        assert!(!html.contains(bad), "external resource {bad}");
    }

    // One ridge plot per traced layer, in model order, with one density per
    // class present in the training split.
    let ridges = blocks(html, "<figure class=\"ridge\"", "</figure>");
    let layers: Vec<&str> = ridges.iter().map(|r| attr(r, "data-layer")).collect();
    assert_eq!(layers, traced);
    for r in &ridges {
        let items = tags(r, "<li class=\"series-item");
        let classes: Vec<i32> = items
            .iter()
            .map(|t| attr(t, "data-class").parse().unwrap())
            .collect();
        assert_eq!(
            classes.iter().copied().collect::<BTreeSet<_>>(),
            train_classes
        );
        assert_eq!(classes.len(), train_classes.len());
        let listed: Vec<String> = classes.iter().map(i32::to_string).collect();
        assert_eq!(attr(r, "data-classes"), listed.join(","));
        // Records per class: every training instance of the class, once per epoch.
        for t in &items {
            let c: i32 = attr(t, "data-class").parse().unwrap();
            let n = digits.labels[..digits.n_train]
                .iter()
                .filter(|&&l| l == c)
                .count();
            assert_eq!(attr(t, "data-records"), (n * EPOCHS).to_string());
        }
        // plotters drew one filled density per class, in the class's colour,
        // on every grid point (plus the two baseline corners).
        let svg = svg_of(r);
        for t in &items {
            let polygons: Vec<&str> = tags(svg, "<polygon ")
                .into_iter()
                .filter(|p| attr(p, "fill") == attr(t, "data-colour"))
                .collect();
            assert_eq!(polygons.len(), 1, "{t}");
            assert_eq!(
                points(polygons[0]),
                attr(t, "data-points").parse::<usize>().unwrap() + 2
            );
        }
        assert_eq!(tags(svg, "<polygon ").len(), train_classes.len());
        // The predicted class is highlighted, exactly once: listed, and the
        // one black density outline.
        let predicted = tags(r, "<li class=\"series-item predicted\"");
        assert_eq!(predicted.len(), 1);
        assert_eq!(attr(predicted[0], "data-class"), attr(r, "data-predicted"));
        let black: Vec<&str> = tags(svg, "<polyline ")
            .into_iter()
            .filter(|p| attr(p, "stroke") == "#000000" && attr(p, "stroke-width") == "2")
            .collect();
        assert_eq!(black.len(), 1);
        assert_eq!(
            points(black[0]),
            attr(predicted[0], "data-points").parse::<usize>().unwrap()
        );
        // Shared cosine axis from −1 to 1, labelled.
        // (plotters writes a text's content on its own line.)
        for tick in ["-1", "-0.5", "0", "0.5", "1"] {
            assert!(svg.contains(&format!(">\n{tick}\n<")), "tick {tick}");
        }
        assert!(svg.contains(">\ncosine("));
    }

    // Class shares plus the residual sum to 1 (completeness, plain SGD); one
    // bar each, drawn in its colour.
    let shares = blocks(html, "<figure class=\"shares\"", "</figure>");
    assert_eq!(shares.len(), traced.len());
    for s in &shares {
        let items = tags(s, "<li class=\"series-item");
        assert_eq!(items.len(), train_classes.len() + 1);
        assert_eq!(attr(items[items.len() - 1], "data-class"), "residual");
        let total: f64 = items
            .iter()
            .map(|t| attr(t, "data-share").parse::<f64>().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "shares sum to {total}");
        let svg = svg_of(s);
        for t in &items {
            let bars = tags(svg, "<rect ")
                .into_iter()
                .filter(|b| attr(b, "fill") == attr(t, "data-colour"))
                .count();
            assert_eq!(bars, 1, "{t}");
        }
    }

    // Class shares per epoch: one line per class with one point per epoch,
    // drawn in the class's colour.
    let epochs = blocks(html, "<figure class=\"epochs\"", "</figure>");
    assert_eq!(epochs.len(), traced.len());
    for e in &epochs {
        assert_eq!(attr(e, "data-epochs"), EPOCHS.to_string());
        let items = tags(e, "<li class=\"series-item");
        assert_eq!(
            items
                .iter()
                .map(|t| attr(t, "data-class").parse::<i32>().unwrap())
                .collect::<BTreeSet<_>>(),
            train_classes
        );
        assert_eq!(items.len(), train_classes.len());
        let svg = svg_of(e);
        for t in &items {
            assert_eq!(attr(t, "data-points"), EPOCHS.to_string());
            let lines: Vec<&str> = tags(svg, "<polyline ")
                .into_iter()
                .filter(|p| attr(p, "stroke") == attr(t, "data-colour"))
                .collect();
            assert_eq!(lines.len(), 1, "{t}");
            assert_eq!(points(lines[0]), EPOCHS);
        }
    }

    // Galleries of k images, labelled as in the data, sorted by influence.
    let galleries = blocks(html, "<div class=\"gallery\"", "</div>");
    assert_eq!(galleries.len(), 2 * traced.len());
    for g in &galleries {
        let items = tags(g, "<figure class=\"gallery-item\"");
        assert_eq!(items.len(), K);
        assert_eq!(
            g.matches("<svg class=\"digit\"").count(),
            K,
            "one image each"
        );
        let infl: Vec<f64> = items
            .iter()
            .map(|t| attr(t, "data-influence").parse().unwrap())
            .collect();
        for t in &items {
            let id: usize = attr(t, "data-instance").parse().unwrap();
            assert!(id < digits.n_train, "a training instance");
            assert_eq!(attr(t, "data-label"), digits.labels[id].to_string());
        }
        let proponents = attr(g, "data-kind") == "proponents";
        for w in infl.windows(2) {
            assert!(
                if proponents {
                    w[0] >= w[1]
                } else {
                    w[0] <= w[1]
                },
                "{infl:?}"
            );
        }
        assert!(if proponents {
            infl[0] > 0.0
        } else {
            infl[0] < 0.0
        });
    }

    // The probe drawn in the header: one dark cell per non-zero pixel.
    let header = blocks(html, "<div class=\"probe-image\">", "</svg>");
    assert_eq!(header.len(), 1);
    let row = &digits.features[PROBE as usize * 64..(PROBE as usize + 1) * 64];
    let lit = row.iter().filter(|&&p| p > 0.0).count();
    // One white background rect plus one per lit pixel.
    assert_eq!(header[0].matches("<rect ").count(), lit + 1);
    let true_class = digits.labels[PROBE as usize].to_string();
    assert!(html.contains("<th>true class</th><td><span style=\"color:"));
    let tc = blocks(html, "<th>true class</th>", "</tr>");
    assert_span(tc[0], &true_class);
}

/// Asserts that `block` has a span whose text is `text`.
fn assert_span(block: &str, text: &str) {
    assert!(
        block.contains(&format!(">{text}</span>")),
        "{text}: {block}"
    );
}

/// The data map has one point per training instance, placed and coloured as
/// `reptrace query data_map` says, with the counts per region; the gallery
/// shows the top 12 mislabel candidates of `reptrace query
/// mislabel_candidates`, drawn from the data.
#[test]
fn report_shows_the_training_dynamics() {
    use reptrace_report::{AMBIGUOUS, CANDIDATES, EASY, plots::correctness_colour};
    let f = fixture();
    let html = &f.html;
    let dir = f.run.parent().unwrap();
    let digits = reptrace_tch::data::digits().unwrap();
    let n = digits.n_train;
    assert_eq!(html.matches("<section class=\"dynamics\"").count(), 1);
    assert!(!html.contains("no-dynamics"));

    let map = cli(dir).query_csv(
        "run",
        "data_map",
        &[&format!("ambiguous={AMBIGUOUS}"), &format!("easy={EASY}")],
    );
    assert_eq!(map.len(), n, "every training instance");
    let num =
        |r: &std::collections::BTreeMap<String, String>, c: &str| -> f64 { r[c].parse().unwrap() };

    let figures = blocks(html, "<figure class=\"datamap\"", "</figure>");
    assert_eq!(figures.len(), 1);
    let fig = figures[0];
    assert_eq!(attr(fig, "data-points"), n.to_string());
    assert_eq!(attr(fig, "data-ambiguous"), AMBIGUOUS.to_string());
    assert_eq!(attr(fig, "data-easy"), EASY.to_string());
    let svg = svg_of(fig);
    let circles = tags(svg, "<circle ");
    assert_eq!(circles.len(), n, "one point per training instance");
    assert_eq!(svg.matches("<title>instance ").count(), n);
    // Drawn in the query's order (by instance id), each titled with its id
    // and coloured by its correctness (a multiple of 1/epochs).
    let at = |t: &str| -> (i32, i32) {
        (
            attr(t, "cx").parse().unwrap(),
            attr(t, "cy").parse().unwrap(),
        )
    };
    let mut colours = BTreeSet::new();
    let points = blocks(svg, "<circle ", "</circle>");
    assert_eq!(points.len(), n);
    for ((row, c), point) in map.iter().zip(&circles).zip(&points) {
        let rest = &point[c.len()..];
        assert!(
            rest.starts_with(&format!(
                "<title>instance {}, class {}: ",
                row["instance_id"], row["label"]
            )),
            "{}",
            rest
        );
        let corr = num(row, "correctness");
        assert!((corr * EPOCHS as f64 - (corr * EPOCHS as f64).round()).abs() < 1e-9);
        assert_eq!(attr(c, "fill"), correctness_colour(corr));
        colours.insert(attr(c, "fill"));
    }
    assert!(colours.len() >= 2, "{colours:?}");
    // Positions are monotone in the values (ties: same pixel or next to it).
    let by = |col: &str, axis: fn((i32, i32)) -> i32, sign: i32| {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| num(&map[a], col).total_cmp(&num(&map[b], col)));
        let px: Vec<i32> = idx.iter().map(|&i| sign * axis(at(circles[i]))).collect();
        assert!(px.windows(2).all(|w| w[0] <= w[1]), "{col}");
        assert!(px[n - 1] > px[0], "{col} spreads");
    };
    by("variability", |p| p.0, 1);
    by("confidence", |p| p.1, -1);
    // Counts per region, as the query has them.
    let rows = tags(html, "<tr data-region=");
    let regions: Vec<&str> = rows.iter().map(|t| attr(t, "data-region")).collect();
    assert_eq!(regions, ["easy", "ambiguous", "hard"]);
    for t in &rows {
        let want = map
            .iter()
            .filter(|r| r["region"] == attr(t, "data-region"))
            .count();
        assert_eq!(attr(t, "data-count"), want.to_string(), "{t}");
    }

    // The gallery: the query's top 12, in order, labelled as in the data,
    // each drawn.
    let top = cli(dir).query_csv("run", "mislabel_candidates", &[&format!("k={CANDIDATES}")]);
    assert_eq!(top.len(), CANDIDATES);
    let galleries = blocks(html, "<div class=\"gallery mislabel\"", "</div>");
    assert_eq!(galleries.len(), 1);
    let g = galleries[0];
    assert_eq!(attr(g, "data-items"), CANDIDATES.to_string());
    let items = tags(g, "<figure class=\"gallery-item\"");
    assert_eq!(items.len(), CANDIDATES);
    assert_eq!(g.matches("<svg class=\"digit\"").count(), CANDIDATES);
    let mut last = f64::INFINITY;
    for (i, (t, row)) in items.iter().zip(&top).enumerate() {
        assert_eq!(attr(t, "data-rank"), (i + 1).to_string());
        assert_eq!(attr(t, "data-instance"), row["instance_id"]);
        assert_eq!(attr(t, "data-predicted"), row["predicted_at_end"]);
        let id: usize = row["instance_id"].parse().unwrap();
        assert!(id < n, "a training instance");
        assert_eq!(attr(t, "data-label"), digits.labels[id].to_string());
        let score: f64 = attr(t, "data-score").parse().unwrap();
        assert!((score - num(row, "score")).abs() <= 1e-9 * score.abs().max(1.0));
        assert!(score <= last && score > 0.0, "by score");
        last = score;
    }
    for t in &items {
        let id = attr(t, "data-instance");
        let fig = blocks(
            g,
            &format!("<figure class=\"gallery-item\" data-instance=\"{id}\""),
            "</figure>",
        );
        let label: i32 = attr(t, "data-label").parse().unwrap();
        let predicted: i32 = attr(t, "data-predicted").parse().unwrap();
        assert_span(fig[0], &format!("given {label}"));
        assert_span(fig[0], &format!("predicted {predicted}"));
    }
}

/// A run trained with `--no-examples` has no training dynamics: the section
/// says so in one line, and the rest of the report is drawn as usual.
#[test]
fn report_without_examples_says_so() {
    let dir = tempfile::tempdir().unwrap();
    train_run(dir.path(), &["--epochs", "1", "--no-examples"]);
    let probe = PROBE.to_string();
    let o = cli(dir.path()).output(&[
        "report", "run", "--probe", &probe, "--k", "3", "--out", "r.html",
    ]);
    assert!(o.status.success(), "report: {}", text(&o.stderr));
    let html = std::fs::read_to_string(dir.path().join("r.html")).unwrap();
    let notice = blocks(&html, "<p class=\"stats no-dynamics\">", "</p>");
    assert_eq!(notice.len(), 1);
    assert!(notice[0].ends_with(
        ">this run has no training dynamics (format ≤ 5 or recorded with --no-examples)"
    ));
    let section = blocks(&html, "<section class=\"dynamics\"", "</section>");
    assert_eq!(section.len(), 1);
    assert_eq!(
        section[0],
        format!(
            "<section class=\"dynamics\" id=\"dynamics\"><h2>Training dynamics</h2>{}</p>",
            notice[0]
        )
    );
    assert!(!html.contains("datamap"));
    assert!(!html.contains("mislabel"));
    assert_eq!(html.matches("<figure class=\"ridge\"").count(), 3);
    assert_eq!(blocks(&html, "<div class=\"gallery\"", "</div>").len(), 6);
}

#[test]
fn report_errors_name_the_flag_or_probe() {
    let f = fixture();
    let dir = f.run.parent().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--probe", "x"], "error: --probe"),
        (&["--probe", "1437", "--k", "0"], "error: --k"),
        (
            &["--probe", "1437", "--layers", "fc9"],
            "unknown layer \"fc9\"",
        ),
        (&["--probe", "5"], "probe 5 was not recorded"),
        (&["--probe", "99999"], "probe 99999 was not recorded"),
    ];
    for (args, want) in cases {
        let mut all = vec!["report", "run", "--out", "bad.html"];
        all.extend_from_slice(args);
        let o = cli(dir).output(&all);
        reptrace_testkit::cli::assert_one_line_error(&o, &[*want]);
        assert!(!dir.join("bad.html").exists());
    }
}

/// Distinct colours and non-white pixels of an 8-bit PNG.
fn png_stats(path: &Path) -> (usize, usize, u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let mut colours = BTreeSet::new();
    let mut non_white = 0;
    for y in 0..info.height as usize {
        let line = &buf[y * info.line_size..][..info.width as usize * channels];
        for px in line.chunks(channels) {
            let rgb: Vec<u8> = px.iter().take(3).copied().collect();
            if rgb.iter().any(|&c| c < 250) {
                non_white += 1;
            }
            colours.insert(rgb);
        }
    }
    (colours.len(), non_white, info.width, info.height)
}

#[test]
fn report_renders_in_headless_chromium() {
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        if std::env::var_os("REPTRACE_SKIP_BROWSER").is_some() {
            return;
        }
        panic!(
            "/usr/bin/chromium is missing: run scripts/setup.sh as root (or set REPTRACE_SKIP_BROWSER=1)"
        );
    }
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", f.html_path.canonicalize().unwrap().display());
    let browse = |extra: &[String]| -> Output {
        let profile = tempfile::tempdir_in(tmp.path()).unwrap();
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--window-size=1400,3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    // The DOM after load: the inline hook counts script errors.
    let o = browse(&["--dump-dom".into()]);
    let dom = text(&o.stdout);
    let err = text(&o.stderr);
    assert!(o.status.success(), "chromium: {err}");
    assert!(
        dom.contains("data-errors=\"0\""),
        "script errors: {}",
        &dom[..dom.len().min(300)]
    );
    assert_eq!(dom.matches("<figure class=\"ridge\"").count(), 3);
    assert_eq!(dom.matches("<figure class=\"datamap\"").count(), 1);
    for line in err.lines() {
        assert!(
            !line.contains("Uncaught") && !line.contains(":CONSOLE("),
            "console message: {line}"
        );
    }
    // The screenshot is a real rendering: many colours, much ink.
    let shot = tmp.path().join("report.png");
    let o = browse(&[format!("--screenshot={}", shot.display())]);
    assert!(o.status.success(), "chromium: {}", text(&o.stderr));
    let (colours, non_white, w, h) = png_stats(&shot);
    assert_eq!((w, h), (1400, 3000));
    assert!(colours >= 50, "{colours} distinct colours");
    assert!(
        non_white as f64 > 0.02 * (w * h) as f64,
        "{non_white} non-white pixels"
    );
}
