//! The language-neutral `schemas/` must say exactly what the Rust code does.
//!
//! Tables: every column's name, type and nullability in `schemas/<table>.json`
//! equals `reptrace_format::schema`. Manifest: example manifests that use
//! every field validate against `schemas/manifest.schema.json`, and every
//! property the JSON Schema names is produced by some example (both
//! directions, so neither side can grow alone).
use reptrace_format::schema::type_name;
use reptrace_format::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn read_json(name: &str) -> Value {
    let path = schemas_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn table_schemas_match_json() {
    for table in Table::ALL {
        let doc = read_json(&format!("{}.json", table.name()));
        assert_eq!(doc["table"], table.name());
        assert_eq!(doc["format_version"], FORMAT_VERSION);
        let partitioned = doc["partitioned_by"].as_str() == Some("layer");
        assert_eq!(partitioned, table.is_partitioned(), "{table}: partitioning");
        let cols = doc["columns"].as_array().expect("columns");
        for dtype in [Dtype::F32, Dtype::F16] {
            let rust = schema(table, dtype);
            assert_eq!(
                rust.fields().len(),
                cols.len(),
                "{table}: number of columns"
            );
            for (field, col) in rust.fields().iter().zip(cols) {
                assert_eq!(
                    col["name"],
                    field.name().as_str(),
                    "{table}: column order/name"
                );
                let ty = col["type"]
                    .as_str()
                    .expect("type")
                    .replace("$dtype", &type_name(&dtype.arrow()));
                assert_eq!(
                    ty,
                    type_name(field.data_type()),
                    "{table}.{}: type",
                    field.name()
                );
                assert_eq!(
                    col["nullable"],
                    field.is_nullable(),
                    "{table}.{}: nullable",
                    field.name()
                );
                assert!(
                    col["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{table}.{}: description",
                    field.name()
                );
            }
        }
    }
}

/// A small validator for the subset of JSON Schema that manifest.schema.json
/// uses. Records every (schema path, property) it checks in `seen`.
struct Validator<'a> {
    root: &'a Value,
    seen: BTreeSet<String>,
}

impl Validator<'_> {
    fn check(&mut self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let name = r
                .strip_prefix("#/$defs/")
                .ok_or(format!("{at}: unsupported $ref {r}"))?;
            let target = self.root["$defs"][name].clone();
            return self.check(&target, value, at);
        }
        if let Some(c) = schema.get("const")
            && c != value
        {
            return Err(format!("{at}: expected {c}, found {value}"));
        }
        if let Some(e) = schema.get("enum").and_then(Value::as_array)
            && !e.contains(value)
        {
            return Err(format!("{at}: {value} not in {e:?}"));
        }
        if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
            // Try silently, then record the properties of the branch that matched.
            let ok: Vec<&Value> = one
                .iter()
                .filter(|s| {
                    let mut probe = Validator {
                        root: self.root,
                        seen: BTreeSet::new(),
                    };
                    probe.check(s, value, at).is_ok()
                })
                .collect();
            if ok.len() != 1 {
                return Err(format!("{at}: {} oneOf branches match {value}", ok.len()));
            }
            let branch = ok[0].clone();
            self.check(&branch, value, at)?;
        }
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            let fits = types.iter().any(|t| match *t {
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "string" => value.is_string(),
                "boolean" => value.is_boolean(),
                "array" => value.is_array(),
                "object" => value.is_object(),
                "null" => value.is_null(),
                _ => false,
            });
            if !fits {
                return Err(format!("{at}: {value} is not {types:?}"));
            }
        }
        if let (Some(min), Some(n)) = (
            schema.get("minimum").and_then(Value::as_f64),
            value.as_f64(),
        ) && n < min
        {
            return Err(format!("{at}: {n} < {min}"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            // Two patterns are used; each is checked by its meaning.
            let s = value.as_str().unwrap_or_default();
            match pattern {
                "^[A-Za-z][A-Za-z0-9_]{0,63}$" => layout::check_name("name", s),
                r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$" => layout::check_layer_name(s),
                other => panic!("{at}: pattern {other} has no Rust counterpart"),
            }
            .map_err(|e| format!("{at}: {e}"))?;
        }
        if let Some(a) = value.as_array() {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (a.len() as u64) < min
            {
                return Err(format!("{at}: fewer than {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && (a.len() as u64) > max
            {
                return Err(format!("{at}: more than {max} items"));
            }
            if let Some(items) = schema.get("items") {
                for (i, v) in a.iter().enumerate() {
                    self.check(items, v, &format!("{at}[{i}]"))?;
                }
            }
        }
        if let (Some(props), Some(obj)) = (
            schema.get("properties").and_then(Value::as_object),
            value.as_object(),
        ) {
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let req = req.as_str().unwrap_or_default();
                if !obj.contains_key(req) {
                    return Err(format!("{at}: missing required {req}"));
                }
            }
            for (k, v) in obj {
                match props.get(k) {
                    Some(s) => {
                        let kind = props
                            .get("kind")
                            .and_then(|k| k.get("const"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        self.seen
                            .insert(format!("{}:{kind}.{k}", schema_id(schema)));
                        self.check(s, v, &format!("{at}.{k}"))?;
                    }
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return Err(format!("{at}: property {k} is not in the schema"));
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

/// A stable id for an object schema: its sorted property names.
fn schema_id(schema: &Value) -> String {
    let mut keys: Vec<&String> = schema["properties"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    keys.sort();
    keys.iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Every (object schema, property) pair that the JSON Schema declares.
fn declared(schema: &Value, out: &mut BTreeSet<String>) {
    match schema {
        Value::Object(o) => {
            if let Some(props) = o.get("properties").and_then(Value::as_object) {
                let kind = props
                    .get("kind")
                    .and_then(|k| k.get("const"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                for k in props.keys() {
                    out.insert(format!("{}:{kind}.{k}", schema_id(schema)));
                }
            }
            for v in o.values() {
                declared(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| declared(v, out)),
        _ => {}
    }
}

fn file(path: &str, table: &str, layer: Option<&str>) -> FileEntry {
    FileEntry {
        path: path.into(),
        table: table.into(),
        layer: layer.map(Into::into),
        rows: 10,
        bytes: 1234,
    }
}

fn examples() -> Vec<Manifest> {
    let model = reptrace_testkit::models::every_kind();
    let mut opt = Optimizer::sgd(0.1);
    opt.momentum = 0.9;
    opt.nesterov = true;
    opt.weight_decay = 1e-4;
    opt.schedule = LrSchedule::Step {
        every_epochs: 5,
        gamma: 0.5,
    };
    let classes = (0..10).map(|c| c.to_string()).collect();
    let mut m = Manifest::new(
        "run-1".into(),
        Mode::Instance,
        Dtype::F16,
        model,
        opt,
        classes,
        "2026-11-26T12:00:00Z".into(),
    );
    m.settings.insert("seed".into(), json!(42));
    m.commits.push(Commit {
        seq: 0,
        step: None,
        epoch: None,
        files: vec![file("instances/part-000000.parquet", "instances", None)],
        weights: Some(layout::weights_path(None)),
        probes: Vec::new(),
        time: "t".into(),
    });
    m.commits.push(Commit {
        seq: 1,
        step: Some(Step(44)),
        epoch: Some(0),
        files: vec![
            file("steps/part-000001.parquet", "steps", None),
            // Format 6: training dynamics.
            file("examples/part-000001.parquet", "examples", None),
            // Format 7: what each step applied.
            file("layer_steps/part-000001.parquet", "layer_steps", None),
            file(
                "updates/layer=fc1/part-000001.parquet",
                "updates",
                Some("fc1"),
            ),
        ],
        weights: Some(layout::weights_path(Some(44))),
        probes: vec![file(
            &layout::checkpoint_probes_path("fc1", 1),
            "probes",
            Some("fc1"),
        )],
        time: "t".into(),
    });
    m.status = Status::Aborted;
    m.abort_reason = Some("non-finite loss".into());
    let per_step = Attribution {
        files: vec![file(
            "contributions/layer=fc1/part-000000.parquet",
            "contributions",
            Some("fc1"),
        )],
        probes: "test".into(),
        probe_ids: vec![[1437, 1796]],
        layers: vec!["fc1".into()],
        steps: Some([0, 44]),
        self_only: false,
        by: Aggregation::Step,
        as_of_step: Some(Step(44)),
        time: "t".into(),
    };
    // Format 5: attributions side by side, one of them summed per instance.
    m.attributions = vec![
        per_step.clone(),
        Attribution {
            files: vec![file(
                "influence/layer=fc1/part-000003.parquet",
                "influence",
                Some("fc1"),
            )],
            probes: "ids:1500".into(),
            probe_ids: vec![[1500, 1500]],
            by: Aggregation::Instance,
            ..per_step
        },
    ];

    let mut adam = m.clone();
    adam.optimizer = Optimizer {
        kind: OptimizerKind::Adamw,
        lr: 1e-3,
        schedule: LrSchedule::Cosine { min_lr: 0.0 },
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.01,
        betas: Some([0.9, 0.999]),
        eps: Some(1e-8),
    };
    adam.mode = Mode::Batch;
    adam.status = Status::Complete;
    adam.abort_reason = None;
    adam.attributions = vec![Attribution {
        steps: None,
        as_of_step: None,
        by: Aggregation::Epoch,
        ..m.attributions[0].clone()
    }];
    // Batch mode: the members of each step's batch.
    adam.commits[1]
        .files
        .push(file("batches/part-000001.parquet", "batches", None));
    let mut plain = m.clone();
    plain.optimizer = Optimizer::sgd(0.05);
    plain.status = Status::Recording;
    plain.dtype = Dtype::F32;
    // Format 4: a PyTorch model's traced layers by qualified name, and the
    // training loop's own scheduler.
    let mut torch = plain.clone();
    torch.model = Model {
        name: "ResNetish".into(),
        input_shape: vec![1, 8, 8],
        structure: Structure::TracedLayers,
        modules: vec![Module::Linear(LinearSpec::new(
            "encoder.block1.fc",
            64,
            16,
            true,
        ))],
        // Format 7: a frozen layer left out of the trace.
        frozen: vec!["encoder.stem".into()],
    };
    torch.optimizer.schedule = LrSchedule::External {
        name: "CosineAnnealingLR".into(),
    };
    torch.attributions.clear();
    torch.commits[1].files[1] = file(
        "updates/layer=encoder.block1.fc/part-000001.parquet",
        "updates",
        Some("encoder.block1.fc"),
    );
    torch.commits[1].probes.clear();
    // Probes added to the completed run later: a commit with probes files
    // only, no weights.
    torch.status = Status::Complete;
    torch.commits.push(Commit {
        seq: 2,
        step: Some(Step(44)),
        epoch: Some(0),
        files: vec![file(
            "probes/layer=encoder.block1.fc/part-000002.parquet",
            "probes",
            Some("encoder.block1.fc"),
        )],
        weights: None,
        probes: vec![],
        time: "t".into(),
    });
    vec![m, adam, plain, torch]
}

#[test]
fn manifest_schema_matches_serde() {
    let schema = read_json("manifest.schema.json");
    let mut v = Validator {
        root: &schema,
        seen: BTreeSet::new(),
    };
    for (i, m) in examples().iter().enumerate() {
        let value: Value = serde_json::from_str(&m.to_json()).expect("json");
        v.check(&schema, &value, &format!("example{i}"))
            .unwrap_or_else(|e| panic!("{e}"));
        // And the Rust side reads its own output back.
        let back = Manifest::parse(&m.to_json(), Path::new("example")).expect("parse");
        assert_eq!(&back, m);
    }
    // Runs of older formats (tests/data) validate too: format 4 and older
    // wrote the one attribution of a run as `attribution`.
    for version in 1..FORMAT_VERSION {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../tests/data/v{version}-digits/manifest.json"));
        let text = std::fs::read_to_string(&path).expect("old manifest");
        let value: Value = serde_json::from_str(&text).expect("json");
        v.check(&schema, &value, &format!("v{version}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let m = Manifest::parse(&text, &path).expect("parse");
        assert_eq!(
            m.attributions.len(),
            1,
            "v{version}: its attribution is read"
        );
    }
    let mut all = BTreeSet::new();
    declared(&schema, &mut all);
    let unused: Vec<_> = all.difference(&v.seen).collect();
    assert!(
        unused.is_empty(),
        "properties in manifest.schema.json that no manifest produces: {unused:?}"
    );
}

#[test]
fn validator_rejects_drift() {
    let schema = read_json("manifest.schema.json");
    let mut value: Value = serde_json::from_str(&examples()[0].to_json()).expect("json");
    value["surprise"] = json!(1);
    let mut v = Validator {
        root: &schema,
        seen: BTreeSet::new(),
    };
    assert!(
        v.check(&schema, &value, "m").is_err(),
        "an unknown property must fail"
    );
    let mut value: Value = serde_json::from_str(&examples()[0].to_json()).expect("json");
    value["model"]["modules"][0]["storage"] = json!("dense");
    assert!(
        v.check(&schema, &value, "m").is_err(),
        "an unknown enum value must fail"
    );
}

#[test]
fn manifest_errors_name_the_problem() {
    let p = Path::new("run/manifest.json");
    let e = Manifest::parse("{\"format\": \"reptrace\", \"format_version\": 99}", p)
        .expect_err("version");
    assert!(e.to_string().contains("version 99"), "{e}");
    let e = Manifest::parse("{\"format\": \"reptr", p).expect_err("truncated");
    assert!(
        e.to_string()
            .starts_with("run/manifest.json: invalid manifest"),
        "{e}"
    );
    let mut m: Value = serde_json::from_str(&examples()[0].to_json()).expect("json");
    m["commits"][1]["files"][0]["path"] = json!("../../etc/passwd");
    let e = Manifest::parse(&m.to_string(), p).expect_err("escape");
    assert!(e.to_string().contains("stay inside the run"), "{e}");
}

/// The model of a format-7 run (tests/data/v7-digits) reads and writes
/// back unchanged: the new fields of format 8 have defaults and are left
/// out when they hold them.
#[test]
fn format_7_manifest_reads_and_writes_unchanged() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/v7-digits/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let raw: Value = serde_json::from_str(&text).unwrap();
    let m = Manifest::parse(&text, Path::new("v7")).unwrap();
    assert_eq!(m.format_version, 7);
    assert_eq!(serde_json::to_value(&m.model).unwrap(), raw["model"]);
    let fc3 = m.model.traced_layer("fc3").unwrap();
    assert_eq!(fc3.positions(), 1);
    assert_eq!(fc3.instance_storage(), Storage::Factors);
}
