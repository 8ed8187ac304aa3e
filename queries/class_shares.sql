-- Class shares: per layer, each class's share of a probe's refinement, (sum of dot over the
-- class's records) / ||p||^2. The residual (the weight change no record explains, e.g. weight
-- decay) is its own row with label NULL and source 'residual'. A complete attribution's shares
-- sum to 1 per layer.
-- param: probe (int64) the probe id
WITH by_class AS (
    SELECT layer, label, SUM(dot) AS dot_sum, COUNT(*) AS records
    FROM contributions
    WHERE probe_id = $probe
    GROUP BY layer, label
)
SELECT c.layer,
       c.label,
       CASE WHEN c.label IS NULL THEN 'residual' ELSE 'class' END AS source,
       c.dot_sum / NULLIF(p.p_norm * p.p_norm, 0) AS share,
       c.records
FROM by_class c
JOIN probes p ON p.layer = c.layer AND p.probe_id = $probe
ORDER BY c.layer, c.label NULLS LAST
