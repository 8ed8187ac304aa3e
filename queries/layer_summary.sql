-- Layer summary: per layer, a probe's refinement norm ||p||, the number of attributed records,
-- the positive and negative mass of the records (sums of their positive / negative dots, over
-- ||p||^2), the residual's share, and the total share (1 for a complete attribution).
-- param: probe (int64) the probe id
WITH sums AS (
    SELECT layer,
           SUM(CASE WHEN instance_id IS NOT NULL THEN 1 ELSE 0 END) AS records,
           SUM(CASE WHEN instance_id IS NOT NULL AND dot > 0 THEN dot ELSE 0.0 END) AS positive,
           SUM(CASE WHEN instance_id IS NOT NULL AND dot < 0 THEN dot ELSE 0.0 END) AS negative,
           SUM(CASE WHEN instance_id IS NULL THEN dot ELSE 0.0 END) AS residual,
           SUM(dot) AS total
    FROM contributions
    WHERE probe_id = $probe
    GROUP BY layer
)
SELECT s.layer,
       p.p_norm,
       s.records,
       s.positive / NULLIF(p.p_norm * p.p_norm, 0) AS positive_share,
       s.negative / NULLIF(p.p_norm * p.p_norm, 0) AS negative_share,
       s.residual / NULLIF(p.p_norm * p.p_norm, 0) AS residual_share,
       s.total / NULLIF(p.p_norm * p.p_norm, 0) AS total_share
FROM sums s
JOIN probes p ON p.layer = s.layer AND p.probe_id = $probe
ORDER BY s.layer
