//! `reptrace report`: a short digits run is trained, attributed for one probe
//! and reported by the binary; the HTML's structure is counted through the
//! data attributes the report puts on purpose, and checked against the
//! digits data read independently (reptrace-tch's loader); then the page is
//! rendered by a real headless Chromium.
#![cfg(feature = "tch")]
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The first test row of the digits (probe id = row).
const PROBE: i64 = 1437;
const K: usize = 5;
const EPOCHS: usize = 2;

fn reptrace(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reptrace"))
        .args(args)
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

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
        let o = reptrace(
            dir.path(),
            &[
                "train",
                "--epochs",
                &epochs,
                "--batch-size",
                "64",
                "--out",
                "run",
            ],
        );
        assert!(o.status.success(), "train: {}", text(&o.stderr));
        let probe = PROBE.to_string();
        let k = K.to_string();
        let o = reptrace(
            dir.path(),
            &[
                "report",
                "run",
                "--probe",
                &probe,
                "--k",
                &k,
                "--out",
                "out/r.html",
            ],
        );
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
    assert!(
        tc[0].contains(&format!(">{true_class}</span>")),
        "{}",
        tc[0]
    );
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
        let o = reptrace(dir, &all);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
        assert!(err.contains(want), "{args:?}: {err}");
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
