; Inno Setup 6 script of cp3d for Windows (x64). Built by installers\windows\build.ps1:
;   iscc /DAppVersion=0.1.0 /DSourceDir=..\..\dist\cp3d /DOutputDir=..\..\dist installers\windows\cp3d.iss
; Installs the PyInstaller onedir bundle (cp3d.exe windowed, cp3d-cli.exe console, _internal\)
; into Program Files, with a Start-menu entry, an optional desktop icon, an optional .tif/.tiff
; association ("Open with cp3d"), an optional cp3d-cli on PATH, and an uninstaller.
; User data (models, caches, logs, settings) live in the user's AppData and are left alone.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef SourceDir
  #define SourceDir "..\..\dist\cp3d"
#endif
#ifndef OutputDir
  #define OutputDir "..\..\dist"
#endif
#define AppName "cp3d"
#define AppExe "cp3d.exe"
#define ProgId "cp3d.tiff"

[Setup]
; A fixed AppId keeps upgrades and the uninstaller tied together across versions.
AppId={{5B0C3E7A-6C1F-4E0B-9C39-2F0E3D9A7C51}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher=cp3d developers
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
UninstallDisplayIcon={app}\{#AppExe}
SetupIconFile=..\..\cp3d\resources\icons\cp3d.ico
OutputDir={#OutputDir}
OutputBaseFilename=cp3d-{#AppVersion}-windows-x64-setup
Compression=lzma2/max
SolidCompression=yes
LZMANumBlockThreads=4
ArchitecturesAllowed=x64
ArchitecturesInstallIn64BitMode=x64
; Per-machine by default; the user may choose a per-user install (no admin) in the dialog.
PrivilegesRequired=admin
PrivilegesRequiredOverridesAllowed=dialog
ChangesAssociations=yes
ChangesEnvironment=yes
WizardStyle=modern
MinVersion=10.0

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked
Name: "tifassoc"; Description: "Open .tif / .tiff files with cp3d"; GroupDescription: "File associations:"; Flags: unchecked
Name: "addtopath"; Description: "Add cp3d-cli to PATH (command line)"; GroupDescription: "Command line:"; Flags: unchecked

[Files]
Source: "{#SourceDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#AppExe}"; Comment: "3D cell segmentation"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#AppExe}"; Tasks: desktopicon

[Registry]
; File association (HKA = HKLM for an admin install, HKCU for a per-user one). "Open with"
; entries only: cp3d does not take over .tif from the user's default viewer.
Root: HKA; Subkey: "Software\Classes\{#ProgId}"; ValueType: string; ValueName: ""; ValueData: "TIFF image (cp3d)"; Flags: uninsdeletekey; Tasks: tifassoc
Root: HKA; Subkey: "Software\Classes\{#ProgId}\DefaultIcon"; ValueType: string; ValueName: ""; ValueData: "{app}\{#AppExe},0"; Tasks: tifassoc
Root: HKA; Subkey: "Software\Classes\{#ProgId}\shell\open\command"; ValueType: string; ValueName: ""; ValueData: """{app}\{#AppExe}"" ""%1"""; Tasks: tifassoc
Root: HKA; Subkey: "Software\Classes\.tif\OpenWithProgids"; ValueType: string; ValueName: "{#ProgId}"; ValueData: ""; Flags: uninsdeletevalue; Tasks: tifassoc
Root: HKA; Subkey: "Software\Classes\.tiff\OpenWithProgids"; ValueType: string; ValueName: "{#ProgId}"; ValueData: ""; Flags: uninsdeletevalue; Tasks: tifassoc
Root: HKA; Subkey: "Software\Classes\Applications\{#AppExe}\SupportedTypes"; ValueType: string; ValueName: ".tif"; ValueData: ""; Flags: uninsdeletekey; Tasks: tifassoc
Root: HKA; Subkey: "Software\Classes\Applications\{#AppExe}\SupportedTypes"; ValueType: string; ValueName: ".tiff"; ValueData: ""; Tasks: tifassoc
; cp3d-cli on PATH: the install folder is appended to the machine (or user) Path.
Root: HKLM; Subkey: "SYSTEM\CurrentControlSet\Control\Session Manager\Environment"; ValueType: expandsz; ValueName: "Path"; ValueData: "{olddata};{app}"; Tasks: addtopath; Check: IsAdminInstallMode and NeedsAddPath(ExpandConstant('{app}'))
Root: HKCU; Subkey: "Environment"; ValueType: expandsz; ValueName: "Path"; ValueData: "{olddata};{app}"; Tasks: addtopath; Check: (not IsAdminInstallMode) and NeedsAddPath(ExpandConstant('{app}'))

[Run]
Filename: "{app}\{#AppExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent

[Code]
function PathKey(var Root: Integer): String;
begin
  if IsAdminInstallMode then begin
    Root := HKEY_LOCAL_MACHINE;
    Result := 'SYSTEM\CurrentControlSet\Control\Session Manager\Environment';
  end else begin
    Root := HKEY_CURRENT_USER;
    Result := 'Environment';
  end;
end;

{ True when Dir is not already one of the Path entries. }
function NeedsAddPath(Dir: String): Boolean;
var
  Root: Integer;
  Key, Paths: String;
begin
  Key := PathKey(Root);
  if not RegQueryStringValue(Root, Key, 'Path', Paths) then begin
    Result := True;
    exit;
  end;
  Result := Pos(';' + Uppercase(Dir) + ';', ';' + Uppercase(Paths) + ';') = 0;
end;

{ On uninstall, take the install folder out of Path again (whether or not the task was chosen). }
procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
var
  Root: Integer;
  Key, Paths, Dir: String;
  P: Integer;
begin
  if CurUninstallStep <> usPostUninstall then exit;
  Key := PathKey(Root);
  if not RegQueryStringValue(Root, Key, 'Path', Paths) then exit;
  Dir := ExpandConstant('{app}');
  P := Pos(';' + Uppercase(Dir), Uppercase(Paths));
  if P = 0 then exit;
  Delete(Paths, P, Length(Dir) + 1);
  RegWriteExpandStringValue(Root, Key, 'Path', Paths);
end;
