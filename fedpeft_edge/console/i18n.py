"""Every text of the console, in English and Japanese.

One table: key → (English, Japanese). Templates call ``t("key", name=value)``; a key missing from the
table is a bug that tests/console/test_i18n.py finds by reading the templates. The language is the
``lang`` cookie (the switch in the page sets it), else the browser's Accept-Language, else English.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

LANGUAGES: Final = ("en", "ja")
DEFAULT: Final = "en"
LANG_COOKIE: Final = "fedpeft_lang"

TEXTS: Final[dict[str, tuple[str, str]]] = {
    # frame
    "app_title": ("fedpeft-edge console", "fedpeft-edge コンソール"),
    "nav_fleet": ("Fleet", "拠点一覧"),
    "nav_federation": ("Federation", "連合学習"),
    "nav_events": ("Events", "イベント"),
    "signed_in_as": ("Signed in as {user} ({role})", "{user} でログイン中（{role}）"),
    "role_viewer": ("viewer", "閲覧者"),
    "role_operator": ("operator", "オペレーター"),
    "logout": ("Sign out", "ログアウト"),
    "language": ("Language", "言語"),
    "fleet_name": ("Fleet {fleet}", "フリート {fleet}"),
    "broker_connected": ("connected to the broker", "ブローカーに接続中"),
    "broker_disconnected": ("NOT connected to the broker: figures may be old",
                            "ブローカーに未接続：表示が古い可能性があります"),
    "updated_at": ("Updated {time}", "{time} 更新"),
    "alerts_active": ("{n} alert(s)", "アラート {n} 件"),
    "federation_paused_banner": ("The federation is PAUSED: no round closes and sites do not train.",
                                 "連合学習は一時停止中です：ラウンドは締め切られず、拠点は学習しません。"),
    "malformed_count": ("{n} malformed message(s) ignored", "不正なメッセージ {n} 件を無視しました"),
    # login
    "login_title": ("Sign in", "ログイン"),
    "username": ("User name", "ユーザー名"),
    "password": ("Password", "パスワード"),
    "login_button": ("Sign in", "ログイン"),
    "login_failed": ("Wrong user name or password.", "ユーザー名またはパスワードが違います。"),
    "login_throttled": ("Too many failed attempts. Try again in {s} s.",
                        "失敗が多すぎます。{s} 秒後に再試行してください。"),
    "session_expired": ("Your session has ended. Please sign in again.",
                        "セッションが終了しました。もう一度ログインしてください。"),
    # states
    "state_online": ("online", "接続中"),
    "state_offline": ("offline", "オフライン"),
    "state_paused": ("paused", "一時停止"),
    "state_training": ("training", "学習中"),
    "state_waiting": ("waiting", "待機中"),
    "state_done": ("finished", "完了"),
    "state_needs_bundle": ("needs a new bundle", "新しいバンドルが必要"),
    "state_unknown": ("unknown", "不明"),
    "excluded": ("excluded", "除外中"),
    # fleet page
    "fleet_title": ("Sites", "拠点"),
    "fleet_empty": ("No site has connected to this fleet yet.",
                    "このフリートに接続した拠点はまだありません。"),
    "col_site": ("Site", "拠点"),
    "col_state": ("State", "状態"),
    "col_last_seen": ("Last seen", "最終確認"),
    "col_bundle": ("Bundle / spec", "バンドル / 仕様"),
    "col_runtime": ("Runtime", "ランタイム"),
    "col_rounds": ("Rounds", "参加ラウンド"),
    "col_samples": ("Samples", "サンプル数"),
    "col_heldout": ("Own accuracy", "自拠点の精度"),
    "lora_rank": ("LoRA rank {rank}", "LoRA ランク {rank}"),
    "col_rejected": ("Rejected", "却下"),
    "col_actions": ("Actions", "操作"),
    "none": ("none", "なし"),
    "no_bundle": ("no signed bundle", "署名付きバンドルなし"),
    "ago_s": ("{n} s ago", "{n} 秒前"),
    "ago_min": ("{n} min ago", "{n} 分前"),
    "ago_h": ("{n} h ago", "{n} 時間前"),
    "ago_d": ("{n} days ago", "{n} 日前"),
    "never": ("never", "なし"),
    "count_states": ("{online} online · {training} training · {waiting} waiting · {paused} paused · "
                     "{offline} offline",
                     "接続中 {online} · 学習中 {training} · 待機中 {waiting} · 一時停止 {paused} · "
                     "オフライン {offline}"),
    # actions
    "act_pause": ("Pause", "一時停止"),
    "act_resume": ("Resume", "再開"),
    "act_exclude": ("Exclude", "除外"),
    "act_include": ("Include", "除外解除"),
    "act_close_round": ("Close round now", "今すぐラウンドを締め切る"),
    "act_pause_all": ("Pause federation", "連合学習を一時停止"),
    "act_resume_all": ("Resume federation", "連合学習を再開"),
    "confirm_exclude": ("Exclude {site}? Its updates will be rejected until it is included again.",
                        "{site} を除外しますか？再び含めるまで更新は却下されます。"),
    "confirm_close": ("Close the current round now with the updates it has?",
                      "現在のラウンドを、届いている更新で今すぐ締め切りますか？"),
    "action_sent": ("{action} sent (command {cmd}); waiting for confirmation on the status topics.",
                    "{action} を送信しました（コマンド {cmd}）。ステータスでの確認を待っています。"),
    "action_failed": ("{action} was NOT sent: {why}", "{action} は送信されませんでした：{why}"),
    "viewer_hint": ("Viewers can see everything; only operators can act.",
                    "閲覧者はすべて見られますが、操作できるのはオペレーターだけです。"),
    "forbidden_title": ("Not allowed", "権限がありません"),
    "forbidden_text": ("Your account ({role}) may not do this. Ask an operator.",
                       "あなたのアカウント（{role}）ではこの操作はできません。オペレーターに依頼してください。"),
    "bad_request": ("The form was stale or incomplete. Reload the page and try again.",
                    "フォームが古いか不完全です。ページを再読み込みしてやり直してください。"),
    "back": ("Back", "戻る"),
    # federation page
    "federation_title": ("Federation", "連合学習"),
    "round_of": ("Round {round} of {max}", "ラウンド {round} / {max}"),
    "round_open": ("Round {round}", "ラウンド {round}"),
    "finished": ("Finished", "完了"),
    "paused": ("Paused", "一時停止中"),
    "running": ("Running", "実行中"),
    "no_report": ("No report from the aggregator yet (is it running?).",
                  "集約サーバーからの報告はまだありません（起動していますか？）。"),
    "participants": ("Participants this round", "このラウンドの参加拠点"),
    "accepted_of_quorum": ("{accepted} of {quorum} updates in", "{quorum} 件中 {accepted} 件の更新を受信"),
    "deadline": ("Deadline", "締め切り"),
    "deadline_in": ("closes in", "締め切りまで"),
    "deadline_passed": ("deadline passed", "締め切り超過"),
    "deadline_paused": ("clock paused", "時計は停止中"),
    "policy": ("Policy", "方針"),
    "quorum": ("Quorum", "定足数"),
    "min_clients": ("Minimum sites at the deadline", "締め切り時の最少拠点数"),
    "late_policy": ("Late updates", "遅れた更新"),
    "late_drop": ("dropped", "破棄"),
    "late_stale_weighted": ("counted with a staleness weight", "遅延に応じた重みで集計"),
    "round_deadline": ("Round deadline", "ラウンドの締め切り"),
    "aggregation": ("Aggregation", "集約方式"),
    "agg_fedavg": ("FedAvg (weighted mean)", "FedAvg（加重平均）"),
    "agg_fednova": ("FedNova (normalised by local steps)", "FedNova（ローカル更新回数で正規化）"),
    "agg_fedbuff": ("FedBuff (asynchronous, buffered)", "FedBuff（非同期・バッファ方式）"),
    "agg_secagg": ("secure aggregation: the aggregator sees only the sum",
                   "秘密集約：集約サーバーは合計のみを見る"),
    "agg_dp-central": ("differential privacy, noise added centrally", "差分プライバシー（中央でノイズ付加）"),
    "agg_dp-distributed": ("differential privacy, noise added by each site",
                           "差分プライバシー（各拠点でノイズ付加）"),
    "agg_robust-median": ("robust: coordinate-wise median", "頑健化：座標ごとの中央値"),
    "agg_robust-trimmed_mean": ("robust: trimmed mean", "頑健化：トリム平均"),
    "agg_robust-multi_krum": ("robust: multi-Krum", "頑健化：Multi-Krum"),
    "agg_gateways": ("through line gateways", "ラインゲートウェイ経由"),
    "agg_ranks-slotwise": ("mixed LoRA ranks: each rank slot averaged over the sites that train it",
                           "LoRA ランク混在：ランクの各スロットを学習した拠点だけで平均"),
    "agg_ranks-hetlora": ("mixed LoRA ranks: HetLoRA (zero-padded, norm-weighted)",
                          "LoRA ランク混在：HetLoRA（ゼロ埋め・ノルム重み付き）"),
    "agg_ranks-flexlora": ("mixed LoRA ranks: FlexLoRA (SVD of the mean update)",
                           "LoRA ランク混在：FlexLoRA（平均更新の特異値分解）"),
    "agg_ranks-off": ("sites below the LoRA rank refused", "LoRA ランクを下げた拠点は受け付けない"),
    "seconds": ("{n} s", "{n} 秒"),
    "spec": ("Adapter spec", "アダプター仕様"),
    "parameters": ("{n} trainable parameters", "学習パラメーター {n} 個"),
    "chart_accuracy": ("Accuracy", "精度"),
    "chart_loss": ("Loss", "損失"),
    "chart_bytes": ("Bytes received per round", "ラウンドごとの受信バイト数"),
    "series_train_acc": ("training (sites)", "学習（拠点）"),
    "series_eval_acc": ("held-out (sites)", "検証（拠点）"),
    "series_loss": ("mean client loss", "拠点の平均損失"),
    "series_bytes_in": ("updates in", "受信した更新"),
    "no_rounds": ("No round has closed yet.", "締め切られたラウンドはまだありません。"),
    "col_round": ("Round", "ラウンド"),
    "col_participants": ("Sites", "拠点数"),
    "col_accuracy": ("Accuracy", "精度"),
    "col_loss": ("Loss", "損失"),
    "col_bytes": ("Bytes in", "受信バイト"),
    "col_duration": ("Duration", "所要時間"),
    # events page
    "events_title": ("Events", "イベント"),
    "events_empty": ("No events yet.", "イベントはまだありません。"),
    "col_time": ("Time", "時刻"),
    "col_event": ("Event", "イベント"),
    "col_who": ("By", "実行者"),
    "col_detail": ("Detail", "詳細"),
    "filter_all": ("All", "すべて"),
    "filter_actions": ("Operator actions", "オペレーター操作"),
    "filter_alerts": ("Alerts", "アラート"),
    "filter_sites": ("Sites", "拠点"),
    "ev_action": ("operator action", "オペレーター操作"),
    "ev_action_refused": ("action refused", "操作を拒否"),
    "ev_confirmed": ("confirmed", "確認済み"),
    "ev_login": ("signed in", "ログイン"),
    "ev_login_failed": ("failed sign-in", "ログイン失敗"),
    "ev_logout": ("signed out", "ログアウト"),
    "ev_joined": ("site joined", "拠点が接続"),
    "ev_left": ("site left", "拠点が切断"),
    "ev_rejected": ("updates rejected", "更新を却下"),
    "ev_round_closed": ("round closed", "ラウンド終了"),
    "ev_alert": ("ALERT", "アラート"),
    "ev_alert_cleared": ("alert cleared", "アラート解除"),
    "ev_federation_started": ("new federation", "新しい連合学習"),
    "alert_silent": ("{site} has sent nothing for more than {n} rounds",
                     "{site} から {n} ラウンド以上更新がありません"),
    "alert_rejections": ("{site}: more than {pct} % of its updates were rejected",
                         "{site}：更新の {pct} % 超が却下されています"),
    "detail_rejected": ("{count} × {reason}", "{reason} × {count}"),
    "detail_round": ("round {round}, {participants} site(s)", "ラウンド {round}、{participants} 拠点"),
}


def negotiate(cookie: str | None, accept_language: str | None) -> str:
    """The page language: the switch's cookie, else the browser's first supported preference."""
    if cookie in LANGUAGES:
        return str(cookie)
    best, best_q = DEFAULT, -1.0
    for part in (accept_language or "").split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                continue
        lang = tag.strip().lower().split("-")[0]
        if lang in LANGUAGES and q > best_q:  # a tie keeps the earlier entry: browsers list in order
            best, best_q = lang, q
    return best


def translator(lang: str) -> Callable[..., str]:
    """``t(key, **values)`` for one language; an unknown key shows itself (and fails the i18n test)."""
    idx = LANGUAGES.index(lang) if lang in LANGUAGES else 0

    def t(key: str, **values: object) -> str:
        pair = TEXTS.get(key)
        if pair is None:
            return key
        return pair[idx].format(**values) if values else pair[idx]

    return t


__all__ = ["DEFAULT", "LANGUAGES", "LANG_COOKIE", "TEXTS", "negotiate", "translator"]
