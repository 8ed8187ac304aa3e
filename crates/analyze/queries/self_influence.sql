-- Self-influence: probes that are training instances, per layer, by the share of their own
-- refinement that their own records contributed, self_share = (sum of dot over the instance's
-- own records) / ||p||^2, in two tails named for what they mean. tail 'memorised': the k
-- largest positive shares, instances that built their own representation (a model that fits
-- wrong labels memorises them here). tail 'self-opposed': the k most negative shares, instances
-- whose own updates point away from their final representation (a model that does not fit a
-- wrong label keeps pushing against it). Wrong labels can sit in either tail; to find them use
-- mislabel_candidates. tracin is the TracIn-style self-influence of the instance at the layer
-- (tracin_self_influence), beside it as evidence. own_contributions holds each such probe with
-- its own instance's records only (computed on demand: one pass over the updates).
-- param: k (int64, default 10) probes per layer and tail
WITH own AS (
    SELECT c.layer, c.probe_id, SUM(c.dot) AS dot_sum, COUNT(*) AS records
    FROM own_contributions c
    JOIN probes p ON p.layer = c.layer AND p.probe_id = c.probe_id
    WHERE c.instance_id = p.instance_id
    GROUP BY c.layer, c.probe_id
),
tracin AS (
    SELECT layer, instance_id,
           SUM(CAST(update_norm AS DOUBLE) * CAST(update_norm AS DOUBLE)) AS tracin
    FROM updates
    WHERE instance_id IS NOT NULL
    GROUP BY layer, instance_id
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
           ) AS top_rank,
           ROW_NUMBER() OVER (
               PARTITION BY layer ORDER BY self_share ASC NULLS LAST, probe_id ASC
           ) AS bottom_rank
    FROM shares
),
tails AS (
    SELECT layer, 'memorised' AS tail, top_rank AS rank_in_tail, probe_id, instance_id, label,
           predicted, self_share, records
    FROM ranked
    WHERE top_rank <= $k AND self_share > 0
    UNION ALL
    SELECT layer, 'self-opposed' AS tail, bottom_rank AS rank_in_tail, probe_id, instance_id,
           label, predicted, self_share, records
    FROM ranked
    WHERE bottom_rank <= $k AND self_share < 0
)
SELECT t.layer, t.tail, t.rank_in_tail, t.probe_id, t.instance_id, t.label, t.predicted,
       t.self_share, t.records, tr.tracin
FROM tails t
LEFT JOIN tracin tr ON tr.layer = t.layer AND tr.instance_id = t.instance_id
ORDER BY t.layer, t.tail, t.rank_in_tail
