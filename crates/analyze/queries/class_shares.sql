-- Class shares: per layer, each class's share of a probe's refinement, (sum of dot over the
-- class's records) / ||p||^2. The residual (the weight change no record explains, e.g. weight
-- decay; its row has step NULL) is its own row with label NULL and source 'residual'. In batch
-- mode a record is a whole batch and carries a label only when the batch is of one class: mixed
-- batches add up in one row with label NULL and source 'mixed batches' (with --class-pure-batches
-- there is none, and the class shares are exact). A complete attribution's shares sum to 1 per
-- layer.
-- param: probe (int64) the probe id
WITH by_class AS (
    SELECT layer, label, step IS NULL AS residual, SUM(dot) AS dot_sum, COUNT(*) AS records
    FROM contributions
    WHERE probe_id = $probe
    GROUP BY layer, label, step IS NULL
)
SELECT c.layer,
       c.label,
       CASE
           WHEN c.label IS NOT NULL THEN 'class'
           WHEN c.residual THEN 'residual'
           ELSE 'mixed batches'
       END AS source,
       c.dot_sum / NULLIF(p.p_norm * p.p_norm, 0) AS share,
       c.records
FROM by_class c
JOIN probes p ON p.layer = c.layer AND p.probe_id = $probe
ORDER BY c.layer, c.label NULLS LAST, c.residual
