//! Compaction ([`reptrace_record::compact`]): a run recorded without
//! compression, rewritten in the storage encoding, reads back the same,
//! table by table, in each commit; what an interrupted compaction leaves is
//! cleaned up by the next one. (Kills of a real compaction process:
//! `crates/cli/tests/crash.rs`.)
use super::{read_table, step_row, tiny_builder};
use parquet::basic::Compression as Codec;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::{Rng, SeedableRng};
use reptrace_format::{Dtype, Manifest, Table, kv};
use reptrace_record::{Compression, ExampleBatch, ParquetOptions, UpdateBatch, compact};
use std::collections::BTreeMap;
use std::path::Path;

/// Records 12 steps of 32 examples of the tiny model, a commit every 4,
/// with `compression`.
fn record(run: &Path, dtype: Dtype, compression: Compression) -> Manifest {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut rec = tiny_builder(run)
        .dtype(dtype)
        .compression(compression)
        .build()
        .unwrap();
    const N: usize = 32;
    for t in 0..12i64 {
        rec.step(step_row(
            t,
            (t / 4) as i32,
            0.5,
            N as i32,
            1.0 / (t + 1) as f64,
        ))
        .unwrap();
        let ids: Vec<i64> = (0..N as i64).map(|i| N as i64 * t + i).collect();
        let labels: Vec<i32> = (0..N as i32).map(|i| (i + t as i32) % 2).collect();
        // Layer inputs after a ReLU (half zeros), as real factors are.
        let mut vals = |n: usize, relu: bool| -> Vec<f32> {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .map(|x| if relu { x.max(0.0) } else { x })
                .collect()
        };
        let (u1, v1, u2, v2) = (
            vals(N * 3, true),
            vals(N * 2, false),
            vals(N * 2, true),
            vals(N * 2, false),
        );
        for (layer, u, v) in [("fc1", &u1, &v1), ("fc2", &u2, &v2)] {
            rec.updates(
                layer,
                UpdateBatch {
                    step: t,
                    epoch: (t / 4) as i32,
                    instance_ids: &ids,
                    labels: &labels,
                    u,
                    v,
                    update_norm: None,
                    positions: None,
                },
            )
            .unwrap();
        }
        let loss = vals(N, true);
        let predicted: Vec<i32> = labels.iter().map(|l| 1 - l).collect();
        rec.examples(ExampleBatch {
            step: t,
            epoch: (t / 4) as i32,
            instance_ids: &ids,
            labels: &labels,
            loss: &loss,
            predicted: &predicted,
        })
        .unwrap();
        if t % 4 == 3 {
            rec.commit().unwrap();
        }
    }
    rec.finish(&[]).unwrap()
}

/// Every table's rows per commit: (table, layer, commit) → batches.
type Rows = BTreeMap<(String, Option<String>, usize), Vec<arrow_array::RecordBatch>>;

fn rows(run: &Path) -> Rows {
    let m = Manifest::load(run).unwrap();
    let mut out = Rows::new();
    for (i, c) in m.commits.iter().enumerate() {
        for f in &c.files {
            out.entry((f.table.clone(), f.layer.clone(), i))
                .or_default()
                .extend(reptrace_testkit::files::read_parquet(&run.join(&f.path)));
        }
    }
    out
}

/// The codecs and footer metadata of a committed file.
fn footer(path: &Path) -> (Vec<Codec>, BTreeMap<String, String>) {
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let meta = reader.metadata();
    let codecs = meta
        .row_groups()
        .iter()
        .flat_map(|g| g.columns().iter().map(|c| c.compression()))
        .collect();
    let kvs = meta
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .filter(|kv| kv.key != "ARROW:schema")
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
        .collect();
    (codecs, kvs)
}

#[test]
fn compaction_keeps_every_row_and_commit_and_shrinks_the_files() {
    for dtype in [Dtype::F32, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r");
        let m = record(&run, dtype, Compression::None);
        let before = rows(&run);
        let footers: Vec<_> = m
            .all_files()
            .iter()
            .map(|f| footer(&run.join(&f.path)))
            .collect();
        for (codecs, _) in &footers {
            assert!(
                codecs.iter().all(|c| *c == Codec::UNCOMPRESSED),
                "{dtype}: {codecs:?}"
            );
        }
        // The same rows recorded with the storage encoding: the reference size.
        let zstd_run = dir.path().join("z");
        let mz = record(&zstd_run, dtype, Compression::Zstd);
        assert_eq!(
            rows(&zstd_run),
            before,
            "{dtype}: the encoding changes no value"
        );

        let report = compact(&run, &ParquetOptions::default()).unwrap();
        let after = Manifest::load(&run).unwrap();
        assert_eq!(report.files, m.all_files().len(), "{dtype}: {report:?}");
        assert_eq!(
            rows(&run),
            before,
            "{dtype}: rows per table, layer and commit"
        );
        assert_eq!(after.commits.len(), m.commits.len());
        for ((old, new), (_, old_kvs)) in m.all_files().iter().zip(after.all_files()).zip(&footers)
        {
            assert_eq!(
                (&old.table, &old.layer, old.rows),
                (&new.table, &new.layer, new.rows)
            );
            assert_ne!(old.path, new.path, "a compacted file gets a new name");
            assert!(!run.join(&old.path).exists(), "{} is removed", old.path);
            let path = run.join(&new.path);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), new.bytes);
            let (codecs, kvs) = footer(&path);
            assert!(
                codecs.iter().all(|c| matches!(c, Codec::ZSTD(_))),
                "{codecs:?}"
            );
            assert_eq!(&kvs, old_kvs, "footer metadata kept");
            assert!(kvs.contains_key(kv::RUN_ID) && kvs.contains_key(kv::FORMAT_VERSION));
        }
        let bytes = |m: &Manifest| -> u64 { m.all_files().iter().map(|f| f.bytes).sum() };
        assert_eq!(report.bytes_before, bytes(&m));
        assert_eq!(report.bytes_after, bytes(&after));
        assert!(
            report.bytes_after < report.bytes_before,
            "{dtype}: {report:?}"
        );
        // About the size of recording with zstd from the start (these files
        // are a few KB, so pages and footers weigh; on digits runs
        // the digits the column chunks come out the same size).
        assert!(
            (bytes(&after) as f64) <= 1.10 * bytes(&mz) as f64,
            "{dtype}: compacted {} vs zstd {}",
            bytes(&after),
            bytes(&mz)
        );
        // Every table is still read by name through the manifest.
        for t in [Table::Steps, Table::Examples] {
            assert!(!read_table(&run, &after, t, None).is_empty());
        }
        assert_eq!(
            reptrace_testkit::files::listed_parquet(&run).len(),
            after.all_files().len(),
            "{dtype}: no stray file"
        );
        assert_eq!(compact(&run, &ParquetOptions::default()).unwrap().files, 0);
    }
}

#[test]
fn the_next_compaction_removes_what_an_interrupted_one_left() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let m = record(&run, Dtype::F32, Compression::None);
    let old = m.files(Table::Updates)[0].path.clone();
    let saved = std::fs::read(run.join(&old)).unwrap();
    compact(&run, &ParquetOptions::default()).unwrap();
    // Killed after its manifest was written, before the old file went; and
    // a temporary file of one killed before.
    std::fs::write(run.join(&old), &saved).unwrap();
    let temp = run.join("steps/.part-000009-z.parquet.tmp");
    std::fs::write(&temp, b"partial").unwrap();
    let report = compact(&run, &ParquetOptions::default()).unwrap();
    assert_eq!((report.files, report.leftovers), (0, 2), "{report:?}");
    assert!(!run.join(&old).exists() && !temp.exists());
}

#[test]
fn compaction_is_refused_while_the_run_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let rec = tiny_builder(&run)
        .compression(Compression::None)
        .build()
        .unwrap();
    let e = compact(&run, &ParquetOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("still being recorded") && e.contains("compact it"),
        "{e}"
    );
    drop(rec);
    let e = compact(
        &run,
        &ParquetOptions {
            zstd_level: 0,
            ..ParquetOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("zstd_level"), "{e}");
}
