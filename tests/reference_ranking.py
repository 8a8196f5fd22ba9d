"""The original VSRN i2t / t2i: one query at a time, numpy argsort, position of the ground truth.

The yardstick for evaluation.py's counting in chunks (tests and bench/ranking.py).
"""

import numpy as np


def dot_scores(im, s):
    return im @ s.T


def loop_metrics(ranks):
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return (r1, r5, r10, medr, meanr)


def loop_i2t(images, captions, npts=None, score=dot_scores):
    """Each image against all captions; rank of its best of five ground-truth captions."""
    npts = images.shape[0] // 5 if npts is None else npts
    ranks = np.zeros(npts)
    top1 = np.zeros(npts)
    for index in range(npts):
        d = score(images[5 * index : 5 * index + 1], captions).flatten()
        inds = np.argsort(d)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
        top1[index] = inds[0]
    return loop_metrics(ranks), (ranks, top1)


def loop_t2i(images, captions, npts=None, score=dot_scores):
    """The five captions of an image at a time against all images; rank of that image."""
    npts = images.shape[0] // 5 if npts is None else npts
    ims = images[::5]
    ranks = np.zeros(5 * npts)
    top1 = np.zeros(5 * npts)
    for index in range(npts):
        d = score(ims, captions[5 * index : 5 * index + 5]).T
        for i in range(len(d)):
            inds = np.argsort(d[i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
            top1[5 * index + i] = inds[0]
    return loop_metrics(ranks), (ranks, top1)
