-- Self-influence: probes that are training instances, ranked per layer by the share of their own
-- refinement that their own records contributed, (sum of dot over the instance's own records) /
-- ||p||^2. High values mean the instance shaped its own representation (memorisation).
-- own_contributions holds each such probe with its own instance's records only (computed on
-- demand: one pass over the updates, no probes x records product).
-- param: k (int64, default 10) probes per layer
WITH own AS (
    SELECT c.layer, c.probe_id, SUM(c.dot) AS dot_sum, COUNT(*) AS records
    FROM own_contributions c
    JOIN probes p ON p.layer = c.layer AND p.probe_id = c.probe_id
    WHERE c.instance_id = p.instance_id
    GROUP BY c.layer, c.probe_id
),
shares AS (
    SELECT o.layer, o.probe_id, p.instance_id, p.label, p.predicted, o.records,
           o.dot_sum / NULLIF(p.p_norm * p.p_norm, 0) AS self_share
    FROM own o
    JOIN probes p ON p.layer = o.layer AND p.probe_id = o.probe_id
),
ranked AS (
    SELECT layer, probe_id, instance_id, label, predicted, self_share, records,
           ROW_NUMBER() OVER (
               PARTITION BY layer ORDER BY self_share DESC NULLS LAST, probe_id ASC
           ) AS rank_in_layer
    FROM shares
)
SELECT layer, rank_in_layer, probe_id, instance_id, label, predicted, self_share, records
FROM ranked
WHERE rank_in_layer <= $k
ORDER BY layer, rank_in_layer
