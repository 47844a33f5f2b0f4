"""Diagnosis measurements and cause ranking on generated sets with one planted cause each."""

from __future__ import annotations

import numpy as np
import pytest

from mapdet.config import ModelConfig
from mapdet.diagnosis import measures
from mapdet.diagnosis.caps import cap_per_image, infer_cap
from mapdet.diagnosis.measures import diagnose
from mapdet.diagnosis.records import InferredCap
from mapdet.diagnosis.settings import DiagnoseSettings
from mapdet.diagnosis.stats import average_ranks, spearman
from mapdet.diagnosis.tide_matching import ImageTruth
from mapdet.structures import Detections
from tests.diagnosis.scenes import PITCH, capped_scene, detect, manifest, scene, small_scene


def causes(d) -> list[str]:
    return [c.cause for c in d.causes]


def test_perfect_detections_have_no_cause():
    gt, objs = scene(4, lambda i: [1, 2, 3] * 4)
    d = diagnose(gt, detect(objs))
    assert d.summary.AP == pytest.approx(100.0)
    assert all(c.impact == 0 and c.impact_ap50 == 0 for c in d.causes)
    assert set(d.tide.errors) == set(d.tide.counts) == {"cls", "loc", "both", "dupe", "bkg", "miss", "fp", "fn"}
    assert d.fixes.moved_boxes == 0  # exact boxes: nothing for a better-localizing model to fix


def test_detection_cap_ranks_first_when_images_hold_more_objects_than_the_cap():
    gt, objs = scene(4, lambda i: [1, 2, 3] * 40)  # 120 objects per image
    d = diagnose(gt, detect(objs), settings=DiagnoseSettings(cap=100))
    top = d.causes[0]
    assert top.cause == "detection_cap" and top.impact > 10
    curves = d.max_dets.curves
    assert curves.share_images_gt_over_100 == 1.0 and curves.share_images_at_cap == 1.0
    # read at the headline maxDets 100 (per image and class): 40 objects per class fit in it
    assert curves.per_image.at(300).ap == pytest.approx(100.0)
    assert top.impact == pytest.approx(100.0 - curves.per_image.at(100).ap, abs=1e-3)
    # the misses past the cap are the cap's, not "missed"
    assert d.cause("missed").impact == 0


def test_cap_filled_by_the_results_is_estimated_from_the_misses():
    # results capped at 100, 120 objects per image: what lies beyond the cap is not in the results,
    # so the cap's impact is estimated from the objects missed there, never 0
    gt, objs = scene(2, lambda i: [1, 2, 3] * 40)
    d = diagnose(gt, cap_per_image(detect(objs), 100), settings=DiagnoseSettings(cap=100))
    cap = d.cause("detection_cap")
    assert d.causes[0] is cap
    est = d.max_dets.estimate
    assert est.images == 2 and est.missed_gt == 40
    assert est.dAP == pytest.approx(100.0 - d.tide.ap50, abs=1e-6)  # TIDE: fixing them leaves no error
    assert cap.impact == pytest.approx(100.0 - d.summary.AP, abs=1e-3)  # in COCO AP: the same
    assert cap.impact_ap50 == pytest.approx(100.0 - d.summary.AP50, abs=1e-3)
    assert "cannot show what lies beyond their cap of 100" in cap.evidence
    assert d.max_dets.choice.cap_note is None  # 2 images are too few to infer a cap: the given one stands


def test_cap_is_inferred_from_results_when_none_is_given():
    gt, dets = capped_scene()
    d = diagnose(gt, dets)  # no cap given: the default 300 is only an assumption
    md = d.max_dets.choice
    assert md.model_cap == 100 and md.results_cap == 100 and md.given_cap is None
    assert md.inferred == InferredCap(cap=100, images_at_cap=5, evidence=5, images_with_dets=5)
    assert md.cap_source.startswith("inferred: 5 of 5 images with detections hold exactly 100 detections, none more")
    assert md.cap_note is None and d.max_dets.curves.share_images_at_cap == 1.0
    top = d.causes[0]
    assert top.cause == "detection_cap" and top.impact > 30  # a third of the objects lie beyond the cap
    assert "inferred" in top.evidence
    assert d.max_dets.estimate.missed_gt == 5 * 50
    assert d.cause("missed").impact == 0


def test_cap_above_tides_count_is_estimated_from_a_matching_at_that_cap():
    gt, dets = capped_scene(n_img=3, objects=320, cap=300)
    d = diagnose(gt, dets)
    md = d.max_dets
    assert md.model_cap == 300 and md.choice.inferred.cap == 300
    est = md.estimate
    assert est.tide_max_dets == 300 and est.images == 3 and est.missed_gt == 3 * 20
    assert 0 < est.dAP < 10  # 20 of 320 objects lie beyond the cap
    assert 0 < est.gain.ap < 10
    assert d.cause("detection_cap").impact == pytest.approx(est.gain.ap, abs=1e-3)
    group = d.miss_breakdown.groups[0]  # TIDE's own 100 per image bind first: said, not hidden
    assert d.miss_breakdown.cap == 100 and group.count == 3 * 220
    assert "TIDE counts at most 100 per image, fewer than the results' cap of 300" in group.definition


def test_given_cap_that_disagrees_with_the_results_is_reported_and_replaced():
    gt, dets = capped_scene()
    d = diagnose(gt, dets, settings=DiagnoseSettings(cap=300, cap_from="--detections-per-img"))
    md = d.max_dets.choice
    assert md.model_cap == 100 and md.given_cap == 300
    assert "--detections-per-img = 300" in md.cap_note and "uses 100" in md.cap_note
    top = d.causes[0]
    assert top.cause == "detection_cap" and top.impact > 30 and "note: the given cap" in top.evidence


def test_given_cap_that_matches_the_results_has_no_note():
    gt, dets = capped_scene()
    d = diagnose(gt, dets, settings=DiagnoseSettings(cap=100, cap_from="--detections-per-img"))
    md = d.max_dets.choice
    assert md.model_cap == 100 and md.cap_note is None
    assert md.cap_source.startswith("given: --detections-per-img = 100, confirmed by the results")
    assert "note:" not in d.causes[0].evidence


def test_results_without_a_cap_pattern_infer_nothing():
    gt, objs = scene(12, lambda i: [1, 2, 3] * (2 + i))  # 9..42 objects per image, all found
    rng = np.random.default_rng(1)
    dets = detect([o for o in objs if rng.uniform() < 0.8])  # varying counts, the largest in one image
    d = diagnose(gt, dets)
    md = d.max_dets.choice
    assert md.inferred is None and md.model_cap == 300 and md.cap_note is None
    assert md.cap_source.startswith("assumed: model.detections_per_img defaults to 300")
    assert d.max_dets.estimate.dAP == 0 and d.max_dets.curves.share_images_at_cap == 0
    cap = d.cause("detection_cap")
    assert cap.impact == 0 and "beyond" not in cap.evidence
    assert d.miss_breakdown.groups[0].count == 0  # no image over the cap
    un = d.miss_breakdown.group("unexplained")
    assert un.count == d.tide.counts["miss"] > 0
    assert d.cause("missed").impact == pytest.approx(un.gain.ap, abs=1e-3) and un.gain.ap > 0


def test_infer_cap_needs_many_images_at_the_maximum_that_their_objects_do_not_explain():
    def counts(per_image: list[int], objects: int = 150):
        gt, objs = scene(len(per_image), lambda i: [1] * objects)
        by_image = {i + 1: n for i, n in enumerate(per_image)}
        seen: dict[int, int] = {}
        rows = []
        for o in objs:
            seen[o[0]] = seen.get(o[0], 0) + 1
            if seen[o[0]] <= by_image[o[0]]:
                rows.append(o)
        return infer_cap(ImageTruth.from_coco(gt), detect(rows))

    # 20 images with detections: "many" = max(3, 10% of 20) = 3 images at the maximum
    assert counts([100] * 3 + [50 + i for i in range(17)]).cap == 100
    assert counts([100] * 2 + [50 + i for i in range(18)]) is None  # two may tie at the maximum by chance
    # 40 images: 10% is 4, so 3 at the maximum are not enough
    assert counts([100] * 3 + [50 + i for i in range(37)]) is None
    assert counts([100] * 4 + [50 + i for i in range(36)]).cap == 100
    assert counts([9] * 10) is None  # below MIN_INFERRED_CAP
    assert counts([150] * 10) is None  # every image's count is its own number of objects: not a cap


def test_miss_breakdown_partitions_the_misses_over_the_causes():
    # images 1-3: 150 objects, results capped at 100; images 4-9: 9 common medium objects (one never
    # found), a rare class-4 object (never found) and two small objects (never found)
    def classes(i):
        return ([1, 2, 3] * 50) if i <= 3 else [1, 2, 3] * 3 + [4, 1, 2]

    gt, objs = scene(9, classes)
    small = set()
    for a in gt["annotations"]:
        if a["image_id"] > 3 and a["bbox"][0] >= 10 * PITCH:  # the 11th and 12th box: small
            a["bbox"][2:] = [10, 10]
            a["area"] = 100
            small.add((a["image_id"], a["bbox"][0]))
    objs = [o for o in objs if (o[0], o[1][0]) not in small and not (o[0] > 3 and o[1][0] in (0, 9 * PITCH))]
    dets = detect(objs)
    dets = cap_per_image(dets, 100)
    m = manifest({1: 20, 2: 20, 3: 20, 4: 1}, 20)
    d = diagnose(gt, dets, m)
    assert d.max_dets.model_cap == 100  # inferred: 3 of 9 images hold exactly 100
    mb = d.miss_breakdown
    assert mb.precedence == ["detection_cap", "rare_class", "small", "unexplained"]
    counts = {g.group: g.count for g in mb.groups}
    assert counts == {"detection_cap": 150, "rare_class": 6, "small": 12, "unexplained": 6}
    assert sum(counts.values()) == mb.count == d.tide.counts["miss"]
    total = d.tide.errors["miss"]
    for g in mb.groups:
        assert 0 <= g.dAP <= total + 1e-9 and g.dAP_in_order >= -1e-9 and g.gain.ap > 0
    # each group alone is not additive, the in-order increments are: they sum to TIDE's Miss dAP
    assert sum(g.dAP_in_order for g in mb.groups) == pytest.approx(total, abs=1e-9)
    assert mb.dAP == pytest.approx(total, abs=1e-9)
    assert d.cause("missed").impact == pytest.approx(mb.group("unexplained").gain.ap, abs=1e-3)
    assert d.cause("detection_cap").impact == pytest.approx(mb.group("detection_cap").gain.ap, abs=1e-3)
    assert "6 missed objects are of a rare class" in d.cause("class_imbalance").evidence
    assert "12 missed objects are small" in d.cause("small_objects").evidence


def test_rare_classes_never_detected_rank_class_imbalance_first():
    gt, objs = scene(20, lambda i: [1, 2, 3] * 3 + ([4, 5] if i == 1 else []))
    m = manifest({1: 20, 2: 20, 3: 20, 4: 1, 5: 1}, 20)
    d = diagnose(gt, detect(objs, keep=lambda c: c <= 3), m)
    top = d.causes[0]
    assert top.cause == "class_imbalance"
    assert top.impact == pytest.approx(100.0 * 2 / 5)  # (100 - 0) x 2 of 5 classes
    pc = d.per_class
    assert [r.id for r in pc.zero_ap] == [4, 5] and pc.rare == [4, 5]
    # no repeat threshold given: t is the frequency 2/3 of the classes are below (here 1.0: 3 of 5 are in every image)
    assert pc.threshold_derived and pc.repeat_threshold == 1.0
    assert pc.zero_ap[0].repeat_factor == pytest.approx(np.sqrt(1.0 / 0.05))
    assert pc.spearman_ap_vs_freq == pytest.approx(1.0)
    assert d.cause("missed").impact == 0


def test_jittered_boxes_rank_localization_first_without_counting_the_metrics_strictness():
    gt, objs = scene(6, lambda i: [1, 2, 3] * 5)
    d = diagnose(gt, detect(objs, dx=9))  # IoU = 31/49 = 0.63
    assert d.summary.AP50 == pytest.approx(100.0) and d.summary.AP75 == pytest.approx(0.0)
    assert d.summary.AP == pytest.approx(30.0)  # found at IoU 0.5, 0.55, 0.6 of the ten thresholds
    assert causes(d)[0] == "localization"
    # boxes moved to the reference IoU 0.75 count at 0.5..0.75 (6 of 10 thresholds): AP 60, not 100;
    # the 40 points above 0.75 are the metric's strictness (the old AP50 - AP term counted 70)
    # and of those 30 points, reaching a good detector's AP75 / AP50 (0.76, from 0 here) is 76 %
    assert d.causes[0].impact == pytest.approx(0.76 * 30.0, abs=1e-6) and d.causes[0].impact_ap50 == pytest.approx(0.0)
    assert d.fixes.moved_boxes == 90
    assert d.iou_curve.ap[0] == pytest.approx(100.0) and d.iou_curve.ap[-1] == pytest.approx(0.0)


def test_boxes_placed_as_well_as_a_good_detector_places_them_are_not_a_localization_cause():
    gt, objs = scene(6, lambda i: [1, 2, 3] * 5)
    exact, loose = detect(objs), detect(objs, dx=9)  # IoU 1 and 0.63
    keep = np.arange(len(objs)) % 10 == 0  # one box in ten loose: AP75 / AP50 above 0.76
    mixed = type(exact)(exact.image_id, np.where(keep[:, None], loose.boxes, exact.boxes), exact.scores, exact.labels)
    d = diagnose(gt, mixed)
    assert d.summary.AP75 / d.summary.AP50 > 0.76 and d.fixes.moved_boxes > 0
    assert d.cause("localization").impact == pytest.approx(0.0)


def test_small_objects_gap_and_anchor_comparison():
    gt, dets = small_scene()  # every other box 10 x 10 and never found
    model = ModelConfig(min_size=400, max_size=1000, anchor_sizes=[32, 64, 128, 256, 512])
    d = diagnose(gt, dets, settings=DiagnoseSettings(model=model))
    size = d.size
    assert size.share_gt["small"] == pytest.approx(0.5)
    assert size.ap50["small"] == pytest.approx(0.0) and size.ap50["medium"] == pytest.approx(100.0)
    assert size.share_below_smallest_anchor_half == pytest.approx(0.5)  # 10 px x 0.5 scale < 16
    assert size.side_p10_model_input == pytest.approx(5.0) and size.input_scale_median == pytest.approx(0.5)
    assert sum(size.hist_model_input) == len(gt["annotations"])
    # half the boxes, AP small 0 vs medium 100: the gap beyond 0.6 x medium counts, (60 - 0) x 0.5
    assert causes(d)[0] == "small_objects" and d.causes[0].impact == pytest.approx(30.0)


def test_small_objects_found_as_a_good_detector_finds_them_are_not_a_cause():
    gt, _ = small_scene()
    # every medium box found, and 7 of every 10 small ones: AP small about 0.7 x medium's, above the 0.6 reference
    small = [a for a in gt["annotations"] if a["area"] == 100]
    found = {a["id"] for a in small[: len(small) * 7 // 10]} | {a["id"] for a in gt["annotations"] if a["area"] != 100}
    objs = [
        (a["image_id"], [x, y, x + w, y + h], a["category_id"])
        for a in gt["annotations"]
        if a["id"] in found
        for x, y, w, h in [a["bbox"]]
    ]
    settings = DiagnoseSettings(model=ModelConfig(min_size=400, max_size=1000))
    d = diagnose(gt, detect(objs), settings=settings)
    assert 60 < d.size.ap["small"] < 85 and d.size.ap["medium"] == pytest.approx(100.0)
    assert d.cause("small_objects").impact == pytest.approx(0.0)
    # unless the RPN reaches fewer small objects than medium ones (anchors too large): reached as often, AP small
    # would grow by the recall ratio (2x here), up to AP medium
    from mapdet.diagnosis.postprocess import ProposalRecall

    recall = ProposalRecall(0.5, 300.0, {"all": 0.75, "small": 0.5, "medium": 1.0, "large": None}, {})
    d = diagnose(gt, detect(objs), settings=settings, proposal_recall=recall)
    expected = (min(2 * d.size.ap["small"], 100.0) - d.size.ap["small"]) * d.size.share_gt["small"]
    assert d.cause("small_objects").impact == pytest.approx(expected, abs=1e-3) and expected > 5
    assert "reach 50% of small objects" in d.cause("small_objects").evidence


def test_spearman_and_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert average_ranks(np.array([5.0, 1.0, 5.0, 3.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_rebalancing_factors_and_weights():
    m = manifest({1: 20, 2: 1, 3: 0}, 40)  # instances = 3 x images: 60, 3, 0
    r, w = measures.rebalancing(m, t=0.1)
    assert r == {1: 1.0, 2: pytest.approx(2.0), 3: 1.0}  # f = 0.5, 0.025, 0 (never seen: not repeated)
    assert w[2] == pytest.approx(w[1] * np.sqrt(20)) and w[1] + w[2] == pytest.approx(2.0) and w[3] == 1.0


def test_manifest_from_coco_counts_images_and_instances():
    gt, _ = scene(4, lambda i: [1, 1, 2] if i == 1 else [1])
    gt["annotations"][0]["iscrowd"] = 1
    m = measures.manifest_from_coco(gt)
    assert m["num_samples"] == 4
    assert m["class_stats"]["1"] == {"instances": 4, "images": 4} and m["class_stats"]["2"] == {
        "instances": 1,
        "images": 1,
    }
    assert m["class_stats"]["3"] == {"instances": 0, "images": 0}


def test_cap_per_image_keeps_top_scores_of_each_image():
    d = Detections([1, 1, 1, 2, 2], np.zeros((5, 4)), [0.1, 0.9, 0.5, 0.2, 0.3], [1, 1, 2, 1, 1])
    kept = cap_per_image(d, 2)
    pairs = sorted(zip(kept.image_id.tolist(), kept.scores.tolist()))
    assert [i for i, _ in pairs] == [1, 1, 2, 2]
    assert [s for _, s in pairs] == pytest.approx([0.5, 0.9, 0.2, 0.3])
    assert len(cap_per_image(Detections.empty(), 5)) == 0


def test_empty_results_are_diagnosed():
    gt, _ = scene(2, lambda i: [1, 2, 3])
    d = diagnose(gt, Detections.empty())
    assert d.summary.AP == pytest.approx(0.0) and d.tide.counts["miss"] == 6
    assert len(d.causes) == 8  # under_training only with --run


def test_a_rare_frequent_gap_that_frequency_does_not_explain_is_not_class_imbalance():
    from mapdet.diagnosis.causes import _frequency_gap
    from mapdet.diagnosis.records import ClassRow

    def row(i, freq, ap):
        return ClassRow(i, f"c{i}", ap, ap, freq, 10, 1.0, 1.0)

    common, rare = [row(1, 1.0, 0.0), row(2, 0.5, 100.0)], [row(3, 0.2, 0.0), row(4, 0.001, 50.0)]
    # frequent mean 50 vs rare 25: a raw gap of 25 x 2 of 4 classes, but AP falls with frequency here
    assert _frequency_gap(common + rare, rare, common, "ap") == 0.0
    steep = [row(1, 1.0, 100.0), row(2, 0.5, 90.0)], [row(3, 0.1, 60.0), row(4, 0.01, 30.0)]
    gain = _frequency_gap(steep[0] + steep[1], steep[1], steep[0], "ap")
    assert 0 < gain <= (95.0 - 45.0) * 2 / 4


def test_tail_threshold_is_the_frequency_two_thirds_of_the_classes_are_below():
    # the synthetic world's 12 training frequencies (the demo's manifest): t lands near the demo's hand-set 0.3
    freq = [0.008, 0.029, 0.037, 0.037, 0.067, 0.083, 0.221, 0.229, 0.425, 0.467, 0.667, 0.721]
    t = measures.tail_threshold(dict(enumerate(freq)))
    assert t == 0.29 and sum(f < t for f in freq) == 8
    # classes in no training image cannot be repeated and do not move t; none at all: 0.1
    assert measures.tail_threshold({**dict(enumerate(freq)), 99: 0.0}) == t
    assert measures.tail_threshold({1: 0.0}) == 0.1 and measures.tail_threshold({}) == 0.1
    # a 1000-class long tail (Zipf-like, f from 0.5 down to 5e-5) gets a small t, not 0.1
    zipf = {k: 0.5 / (k + 1) ** 1.33 for k in range(1000)}
    assert 1e-4 < measures.tail_threshold(zipf) < 1e-3


def test_a_repeat_threshold_given_is_used_not_derived():
    gt, objs = scene(20, lambda i: [1, 2, 3] * 3 + ([4, 5] if i == 1 else []))
    m = manifest({1: 20, 2: 20, 3: 20, 4: 1, 5: 1}, 20)
    d = diagnose(gt, detect(objs, keep=lambda c: c <= 3), m, DiagnoseSettings(repeat_threshold=0.1))
    pc = d.per_class
    assert pc.repeat_threshold == 0.1 and not pc.threshold_derived
    assert pc.zero_ap[0].repeat_factor == pytest.approx(np.sqrt(0.1 / 0.05))
