-- Data map (dataset cartography, Swayamdipta et al., 2020): every training instance with the
-- mean (confidence) and the population standard deviation (variability) over epochs of the
-- probability the model gave its label, and correctness, the fraction of epochs in which it
-- predicted the label (each epoch's value: the mean over its presentations in that epoch, read
-- from examples). region: 'ambiguous' when variability >= $ambiguous (the model kept changing
-- its mind), else 'easy' when confidence >= $easy, else 'hard' (consistently low: hard to
-- learn, often a wrong label).
-- param: ambiguous (float64, default 0.2) variability from which an instance is ambiguous
-- param: easy (float64, default 0.5) confidence from which a stable instance is easy
WITH by_epoch AS (
    SELECT instance_id, epoch, MIN(label) AS label, AVG(p_label) AS p,
           AVG(CASE WHEN predicted = label THEN 1.0 ELSE 0.0 END) AS correct
    FROM examples
    GROUP BY instance_id, epoch
),
mapped AS (
    SELECT instance_id, MIN(label) AS label, COUNT(*) AS epochs, AVG(p) AS confidence,
           STDDEV_POP(p) AS variability, AVG(correct) AS correctness
    FROM by_epoch
    GROUP BY instance_id
)
SELECT instance_id, label, epochs, confidence, variability, correctness,
       CASE
           WHEN variability >= $ambiguous THEN 'ambiguous'
           WHEN confidence >= $easy THEN 'easy'
           ELSE 'hard'
       END AS region
FROM mapped
ORDER BY instance_id
