-- Top proponents: per layer, the k training instances with the largest influence on a probe.
-- Influence of instance j = (sum of dot over j's records) / ||p||, signed; the influences of all
-- instances plus the residual's sum to ||p||. Ties are broken by instance id.
-- param: probe (int64) the probe id
-- param: k (int64, default 10) instances per layer
WITH influence AS (
    SELECT layer, instance_id, label, SUM(dot) AS dot_sum, COUNT(*) AS records
    FROM contributions
    WHERE probe_id = $probe AND instance_id IS NOT NULL
    GROUP BY layer, instance_id, label
),
ranked AS (
    SELECT i.layer, i.instance_id, i.label, i.records,
           i.dot_sum / NULLIF(p.p_norm, 0) AS influence,
           ROW_NUMBER() OVER (
               PARTITION BY i.layer ORDER BY i.dot_sum DESC, i.instance_id ASC
           ) AS rank_in_layer
    FROM influence i
    JOIN probes p ON p.layer = i.layer AND p.probe_id = $probe
)
SELECT layer, rank_in_layer, instance_id, label, influence, records
FROM ranked
WHERE rank_in_layer <= $k
ORDER BY layer, rank_in_layer
