"""SDBFT light consensus among edge agents (SPEC M7 with its safety amendment).

Modules: `node` (the pure state machine), `messages` (wire format), `signing`
(Signer/Keyring), `contracts` (what a round agrees on), `store` (fsynced
log), `transport` (MQTT), `process` (one node as an OS process), `sim`
(seeded simulator and the PBFT anchor).

Roles and assumptions
    n = K+1 consensus nodes listed, in rotation order, in the regulator-signed
    `meterchain.quorum.Membership`; other microgrids only submit requests.
    Quorum q = n//2 + 1 (more than n/2). Synchronous model: a message between
    correct nodes arrives within delta, and correct nodes open a round within
    delta of each other. Safety and liveness hold with f < n/2 faulty nodes,
    counting Byzantine nodes, crashed nodes, and nodes that lose messages.

Round identity and rotation
    A round is (seq, kind), e.g. (17, "clear") then (18, "settle"); every
    signed statement names market, round, view. The primary of view v of
    round seq is member (seq + v) mod n: k advances after every clearing and
    every settlement, and again on every change of primary. (k is a function
    of the round's identity rather than of history, so nodes never disagree
    on who leads.)

Messages: [statement, sender, signature, attachment], statement =
[tag, market, [seq, kind], view, ref, ...], P-256 signature over it
    req     [.., 0, deposit ref, submitter, body]  a participant's signed bid
    prop    [.., v, value digest, justification digest]  by the primary; attaches
            the value (exact signed request set + contract result), the
            primary's own vote, and for v > 0 the justification (below)
    vote    [.., v, value digest]  attaches the proposal it votes for
    blame   [.., v, primary id]  change-primary request; attaches evidence
            (the wrong proposal, or two conflicting ones)
    cert    [.., v, digest of certificate]  forwards a certificate: q blames
            (leave view v) or q votes (see "objection" below)
    status  [.., v+1, lock digest, lock view]  sent on entering view v+1;
            attaches the node's highest vote certificate and its proposal
    final   [.., 0, value digest]  "I treat this value as final"; q of them
            form the finality certificate; the primary attaches value + QC
    sync    [.., 0, b""]  a recovering node asks for a decided round
Vote and final statements are identical across signers, so they aggregate
into `meterchain.quorum.QuorumCertificate`s.

A round, fault-free
    1. Every node opens the round and broadcasts its signed request.
    2. The primary proposes once it holds every member's request, or 2 delta
       + 1 ms after its open, with the exact request set it used.
    3. A backup checks the proposal (signatures, `contract.check` -- it may
       verify rather than re-execute) and votes, forwarding the proposal; a
       backup whose own request is missing from a fresh proposal votes no
       (blames) -- censorship.
    4. Votes reach everyone; q votes are a vote certificate (QC).
    5. A node treats the value as final when more than 2 delta have passed
       since its own vote, it holds the QC, it saw no conflicting proposal
       of that primary in that view, and it has not left the view. It then
       broadcasts `final`; the primary's carries the value and the QC (the
       SPEC's "primary publishes the result with a quorum certificate").
    6. q finals form the finality certificate (FC): the proof the
       aggregator and late nodes rely on (at least one correct node treated
       the value as final by rule 5).

Timers (delta units; "+1" = 1 ms margins for equal timestamps)
    primary request collection  2 delta + 1 after its open (view 0)
    blame when no usable proposal  view 0: 4 delta + 2 after open;
                                   view v > 0: 3 delta + 1 after entering
    finality window             more than 2 delta after own vote
    objection forwarding        +1 delta after forwarding the QC (below)
    blame when not final        3 delta + 2 after own vote (10 delta + 2 for a
                                node that is final but has no FC yet)
    view-change wait            1 delta between leaving a view and entering
                                the next (sending the status)
    After view (n-1)//2 -- which a round never passes with f < n/2 and delays
    within delta -- the blame timeouts double per view (capped at 64x), so a
    too-small delta still recovers; the 2-delta window and the 1-delta wait
    never grow.

Change of primary
    On a wrong result, a censored request, no proposal or no finality in
    time, or a proof of equivocation (two different signed proposals of one
    primary for one round and view -- every node accepts it), a node
    broadcasts a blame. q blames for view v are a change-primary
    certificate; a node holding one forwards it, stops voting and committing
    in v, waits delta, enters v+1 and broadcasts its status. The new primary
    proposes once it holds q statuses: the value of the highest certified
    lock among them (ties: smallest digest), else a fresh result over every
    request it holds. The proposal carries those q signed statuses and the
    lock's QC; a backup votes for it only if it is justified that way. A
    node can jump to a view with a justified proposal or on a certificate.

Why the amendment is safe (sketch)
    If a correct node h finalises B in view v: (i) any correct node that
    voted for a different proposal in v did so within delta of h's vote
    (else it would have seen B forwarded first), so h saw that vote within
    2 delta -- contradiction; hence no QC for anything else exists in v.
    (ii) Every correct node holds the QC for B before any correct node
    sends a status for a later view: if nobody objected before h's window
    ended, every correct node voted B within delta of h and got every
    correct vote within 2 delta; if someone objected (e.g. a censored node
    voting no), h forwarded the QC and waited one more delta. The first
    correct node to leave v forwards the change certificate, so h leaves
    within delta and commits only before that; statuses go out one delta
    after leaving. (iii) Any q statuses contain a correct one, so every
    later justified proposal is B, by induction over views.
    Finality certificates contain a correct signer, so they agree too.

Liveness bound (`node.liveness_bound_ms`)
    Every correct node commits within 7 delta + 2 ms of the round's first
    open with no faulty node, and within 23 delta + 5 + (f - 1)(16 delta +
    3) ms with f >= 1 faulty nodes (at most f consecutive faulty primaries;
    each costs at most 16 delta + 3, view 0 17 delta + 4, then 6 delta + 1
    under the correct one); the FC follows within one more delta. The
    simulator checks this on every schedule.

Messages per round and what O(n) means
    Fault-free: n requests + 1 proposal + n-1 votes + at most n finals = at
    most 3n MQTT publishes: O(n) publishes on a broker that fans out. Every
    publish reaches every node, so deliveries (point to point) are O(n^2),
    as for PBFT: the safety amendment needs every vote to reach everyone.
    O(n) is the fault-free figure; a change of primary adds O(n) publishes
    (blames, certificate forwards, statuses) whose attachments carry O(n)
    signatures each.

Persistence and recovery
    `Persist` records (the round with our votes and lock, written before a
    proposal or vote goes out; later the decision with its certificate) come
    first in the action list, and the transport fsyncs them before
    publishing anything after them. A request is not an acknowledgement and
    is re-signed byte for byte after a crash (RFC 6979), so opening a round
    writes nothing. A restarted node rebuilds from its log; rounds it was in
    are "recovering": it neither votes nor uses the 2-delta rule (it may have
    missed messages) but asks (`sync`) and decides on a finality
    certificate -- which is also why a `final` attestation need not wait for
    the disk. A round whose messages overflowed the pre-open buffer is
    treated the same way.

Simulation
    `sim.Simulator` drives nodes deterministically from a seed. Tests run
    most schedules with `signing.HashSigner` (keyed hash, simulator only,
    same interface) and a block with real P-256; the keyring caches
    identical (key, message, signature) checks either way.
"""
