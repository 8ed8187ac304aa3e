//! An opened run: its manifest, the files it committed, and the checks that
//! name a damaged one. The bottom of the crate (see the layers in the crate
//! documentation): everything that reads a run stands on [`Run`], and
//! `listing` is the one way a table over committed files is listed.
use crate::{Error, Result};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use reptrace_format::{Manifest, Table, col as c, schema, schema_as_of};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An opened run: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Run {
    dir: PathBuf,
    manifest: Manifest,
}

/// Opens a run directory and reads its manifest.
pub fn open(run: &Path) -> Result<Run> {
    Run::open(run)
}

impl Run {
    /// Opens a run directory and reads its manifest.
    pub fn open(run: &Path) -> Result<Self> {
        let manifest = Manifest::open(run)?;
        let dir = std::fs::canonicalize(run).map_err(|e| Error::io(run, e))?;
        Ok(Self { dir, manifest })
    }

    /// The run directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest as read by [`Run::open`].
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Absolute path of a file given relative to the run.
    pub fn path(&self, rel: &str) -> PathBuf {
        Manifest::resolve(&self.dir, rel)
    }

    /// Re-reads the manifest from disk (after an attribution replaced it).
    pub fn reload(&mut self) -> Result<()> {
        self.manifest = Manifest::open(&self.dir)?;
        Ok(())
    }

    /// Committed files of `table`, grouped by layer (`None` for unpartitioned
    /// tables), in commit order.
    ///
    /// For `probes` these are the probes an analysis stands on
    /// ([`Manifest::analysis_probes`]): the final ones, or the checkpoint
    /// probes of the last commit of a run that did not finish.
    pub fn files_by_layer(&self, table: Table) -> BTreeMap<Option<String>, Vec<PathBuf>> {
        let mut out: BTreeMap<Option<String>, Vec<PathBuf>> = BTreeMap::new();
        let files = match table {
            Table::Probes => self
                .manifest
                .analysis_probes()
                .map(|a| a.files)
                .unwrap_or_default(),
            _ => self.manifest.files(table),
        };
        for f in files {
            let layer = if table.is_partitioned() {
                f.layer.clone()
            } else {
                None
            };
            out.entry(layer).or_default().push(self.path(&f.path));
        }
        out
    }

    /// The first committed file that cannot be read as part of its table:
    /// its footer is unreadable, or a column of the table is missing or has
    /// another type. A failed query over the run is explained by it, so that
    /// the user learns which file is at fault (DataFusion's own message does
    /// not name it).
    pub fn damaged_file(&self) -> Option<Error> {
        for table in Table::ALL {
            // Files of an older run lack the columns added since (readers fill them).
            let want = schema_as_of(table, self.manifest.dtype, self.manifest.format_version);
            for path in self.files_by_layer(table).into_values().flatten() {
                if let Err(e) = check_file(&path, &want) {
                    return Some(e);
                }
            }
        }
        None
    }

    /// `e`, or the damaged file that explains it when the failure came from
    /// reading the run's data.
    pub fn explain(&self, e: Error) -> Error {
        let reading = |m: &str| {
            ["Parquet error", "Arrow error", "IO error", "External error"]
                .iter()
                .any(|w| m.contains(w))
        };
        match e {
            Error::Sql(ref m) | Error::Query { message: ref m, .. } if reading(m) => {
                self.damaged_file().unwrap_or(e)
            }
            e => e,
        }
    }

    /// The Arrow schema of a table as SQL sees it (with `layer` for partitioned tables).
    pub fn sql_schema(&self, table: Table) -> SchemaRef {
        let file_schema = schema(table, self.manifest.dtype);
        if !table.is_partitioned() {
            return file_schema;
        }
        let mut fields: Vec<Field> = file_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(c::LAYER, DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    }
}

/// A listing table over exactly `files` (absolute paths), read with `file_schema`.
pub(crate) fn listing(
    files: &[PathBuf],
    file_schema: SchemaRef,
    parquet: &TableParquetOptions,
) -> Result<ListingTable> {
    let urls = files
        .iter()
        .map(|p| {
            // From a URL rather than a path string, so that characters of the
            // run directory are never read as a glob.
            let url = url::Url::from_file_path(p).map_err(|()| Error::BadOption {
                option: "run directory",
                value: p.display().to_string(),
                why: "cannot be turned into a file URL".into(),
            })?;
            ListingTableUrl::try_new(url, None).map_err(Error::sql)
        })
        .collect::<Result<Vec<_>>>()?;
    let format = ParquetFormat::default().with_options(parquet.clone());
    let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(file_schema);
    ListingTable::try_new(config).map_err(Error::sql)
}

/// Whether `path` is a readable Parquet file with every column of `want`
/// (same name and type).
fn check_file(path: &Path, want: &Schema) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    let have = reader.schema();
    for field in want.fields() {
        let message = match have.field_with_name(field.name()) {
            Err(_) => "missing".to_owned(),
            Ok(f) if !f.data_type().equals_datatype(field.data_type()) => {
                format!("has type {}, expected {}", f.data_type(), field.data_type())
            }
            Ok(_) => continue,
        };
        return Err(Error::Column {
            path: path.to_path_buf(),
            column: field.name().clone(),
            message,
        });
    }
    Ok(())
}
