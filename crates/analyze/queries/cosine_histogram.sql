-- Cosine histogram: per layer and class, the norm-weighted distribution of the cosine between
-- each record's contribution and a probe's refinement, in `bins` equal bins over [-1, 1] (the
-- ridge plot of Pfahler & Morik). Bin b covers [-1 + 2b/bins, -1 + 2(b+1)/bins); cosine 1 falls
-- in the last bin. weight = sum of the records' norms; weight_share = weight / the class's total.
-- Only non-empty bins are listed. Only records count (the residual pseudo-source, step NULL, has
-- no cosine distribution); in batch mode, records of batches of several classes are label NULL.
-- param: probe (int64) the probe id
-- param: bins (int64, default 20) number of bins
WITH binned AS (
    SELECT layer, label, norm,
           CASE
               WHEN cosine >= 1.0 THEN CAST($bins AS BIGINT) - 1
               WHEN cosine <= -1.0 THEN 0
               ELSE CAST(FLOOR((cosine + 1.0) / 2.0 * CAST($bins AS DOUBLE)) AS BIGINT)
           END AS bin
    FROM contributions
    WHERE probe_id = $probe AND step IS NOT NULL
),
hist AS (
    SELECT layer, label, bin, SUM(norm) AS weight, COUNT(*) AS records
    FROM binned
    GROUP BY layer, label, bin
)
SELECT layer,
       label,
       bin,
       -1.0 + 2.0 * CAST(bin AS DOUBLE) / CAST($bins AS DOUBLE) AS bin_lo,
       -1.0 + 2.0 * CAST(bin + 1 AS DOUBLE) / CAST($bins AS DOUBLE) AS bin_hi,
       weight,
       weight / NULLIF(SUM(weight) OVER (PARTITION BY layer, label), 0) AS weight_share,
       records
FROM hist
ORDER BY layer, label NULLS LAST, bin
