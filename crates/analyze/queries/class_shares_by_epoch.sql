-- Class shares by epoch: per layer and epoch, each class's share of a probe's refinement,
-- (sum of dot over the class's records of that epoch) / ||p||^2: how the representation was
-- refined over training. The residual is its own row with epoch and label NULL and source
-- 'residual'; in batch mode, the mixed batches of an epoch share one row with label NULL and
-- source 'mixed batches' (none with class-pure batches).
-- param: probe (int64) the probe id
WITH by_class AS (
    SELECT layer, epoch, label, SUM(dot) AS dot_sum, COUNT(*) AS records
    FROM contributions
    WHERE probe_id = $probe
    GROUP BY layer, epoch, label
)
SELECT c.layer,
       c.epoch,
       c.label,
       CASE
           WHEN c.label IS NOT NULL THEN 'class'
           WHEN c.epoch IS NULL THEN 'residual'
           ELSE 'mixed batches'
       END AS source,
       c.dot_sum / NULLIF(p.p_norm * p.p_norm, 0) AS share,
       c.records
FROM by_class c
JOIN probes p ON p.layer = c.layer AND p.probe_id = $probe
ORDER BY c.layer, c.epoch NULLS LAST, c.label NULLS LAST
